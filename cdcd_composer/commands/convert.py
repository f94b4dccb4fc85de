"""The logic of data_prep/convert_tinystories.py (its command line: `arguments.convert_parser`)."""

from __future__ import annotations

import logging
import sys

from cdcd_composer.arguments import convert_parser
from cdcd_composer.data.conversion import convert
from cdcd_composer.data.options import ConvertOptions
from cdcd_composer.outputs import error_line


def parse_args(argv: list[str] | None = None) -> ConvertOptions:
    """Command-line options into a `ConvertOptions`."""
    return ConvertOptions(**vars(convert_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; every failure is one line on stderr and a non-zero exit."""
    opt = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    try:
        meta = convert(opt)
    except (ValueError, OSError) as e:
        print(f'error: {error_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f'interrupted: {opt.out_root} holds only completed splits; rerun the same command to finish',
            file=sys.stderr,
        )
        return 130
    print(f'wrote {meta.num_examples} examples ({meta.num_truncated} truncated) to {opt.out_root}')
    return 0
