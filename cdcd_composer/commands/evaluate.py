"""The logic of eval.py: validation CE against t, samples beside real text (`arguments.evaluate_parser`)."""

from __future__ import annotations

import argparse
import json
import sys

from cdcd_composer.arguments import MAX_NLL_SAMPLES, evaluate_parser
from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.evaluation import Judge
from cdcd_composer.evaluation_report import evaluate, markdown
from cdcd_composer.outputs import check_output_file, run_command, write_output_file
from cdcd_composer.sampler import DEFAULT_SOLVER, SamplerSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (a usage error exits 2)."""
    p = evaluate_parser()
    args = p.parse_args(argv)
    if args.nll_samples == 1 or not 0 <= args.nll_samples <= MAX_NLL_SAMPLES or args.nll_canvases < 1:
        p.error(
            f'--nll_samples must be 0 (skip the bound) or 2 to {MAX_NLL_SAMPLES:,} draws a canvas (the '
            "bound's error falls as 1/sqrt(draws)), --nll_canvases at least 1"
        )
    try:  # each temperature's range, before any model is loaded
        for tau in args.tau or [1.0]:
            SamplerSettings(solver=args.solver or DEFAULT_SOLVER, tau=tau)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: exit 0, or one line and 2 (usage), 1 (failed) or 130 (`run_command`)."""
    args = parse_args(argv)
    interrupted = 'while evaluating: no report was printed or written; rerun to evaluate'
    return run_command(lambda: evaluate_and_report(args), interrupted)


def evaluate_and_report(args: argparse.Namespace) -> int:
    """Evaluates, prints the report and writes `--out`."""
    if args.out:
        check_output_file(args.out, inputs=[args.model, args.data_root, args.local_cache, args.judge])
    judge = (
        None if args.judge == 'none' else Judge(args.judge, args.device)
    )  # a missing one: before the model
    model = load_trained_model(args.model, args.device, trust=args.trust_checkpoint, weights=args.weights)
    report = evaluate(
        model, args.data_root, local_cache=args.local_cache, judge=judge, num_samples=args.num_samples,
        steps=args.steps and tuple(args.steps), taus=args.tau and tuple(args.tau),
        solver=args.solver,
        batch_size=args.batch_size,
        seed=args.seed, nll_samples=args.nll_samples, nll_canvases=args.nll_canvases,
    )  # fmt: skip
    report['command'] = ' '.join(sys.argv)
    print(markdown(report))
    if args.out:
        write_output_file(args.out, lambda f: json.dump(report, f, indent=2))
    return 0
