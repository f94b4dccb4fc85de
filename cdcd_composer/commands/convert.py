"""The logic of data_prep/convert_tinystories.py (its command line: `arguments.convert_parser`)."""

from __future__ import annotations

import logging

from cdcd_composer.arguments import convert_parser
from cdcd_composer.data.conversion import convert
from cdcd_composer.data.options import ConvertOptions
from cdcd_composer.outputs import run_command


def parse_args(argv: list[str] | None = None) -> ConvertOptions:
    """Command-line options into a `ConvertOptions`."""
    return ConvertOptions(**vars(convert_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: exit 0, or one line and 2 (usage), 1 (failed) or 130 (`run_command`)."""
    opt = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    interrupted = f': {opt.out_root} holds only completed splits; rerun the same command to finish'
    return run_command(lambda: convert_and_say(opt), interrupted)


def convert_and_say(opt: ConvertOptions) -> int:
    """Converts and says what was written."""
    meta = convert(opt)
    print(f'wrote {meta.num_examples} examples ({meta.num_truncated} truncated) to {opt.out_root}')
    return 0
