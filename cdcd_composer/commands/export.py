"""The logic of export.py: a weights-only export or a Hugging Face folder (`arguments.export_parser`)."""

from __future__ import annotations

import argparse

from cdcd_composer.arguments import export_parser
from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.export import write_export
from cdcd_composer.outputs import check_not_an_input, run_command
from cdcd_composer.storage import StorageFault


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = export_parser()
    args = p.parse_args(argv)
    if args.format != 'hf' and (args.eval or args.push_to_hub):
        p.error('--eval and --push_to_hub go with --format hf')
    return args


def main(argv: list[str] | None = None) -> int:
    """`python export.py MODEL OUT_DIR [--format hf]`: exit 0, or one line and 2, 1 or 130 (`run_command`)."""
    args = parse_args(argv)
    # The export is staged and renamed into place: nothing half-written stays.
    status = run_command(
        lambda: export(args), f'while exporting: {args.out_dir} is as it was; rerun to export'
    )
    if status or not args.push_to_hub:
        return status
    interrupted = (
        f'while uploading: {args.out_dir} is written; rerun with --push_to_hub or upload it with '
        'huggingface-cli upload'
    )
    return run_command(lambda: upload(args), interrupted)


def export(args: argparse.Namespace) -> int:
    """Writes the export or the Hugging Face folder."""
    check_not_an_input(args.out_dir, [args.checkpoint, args.eval], 'OUT_DIR')
    if args.format == 'hf':
        from cdcd_composer.hf.folder import read_report, write_hf_export

        report = read_report(args.eval) if args.eval else None
    model = load_trained_model(args.checkpoint, trust=args.trust_checkpoint, weights=args.weights)
    if args.format == 'hf':
        write_hf_export(args.out_dir, model, report)
    else:
        write_export(args.out_dir, model.state_dict(), args.weights, model.trained)
    print(
        f'exported {args.checkpoint} ({model.spec.weights} weights) to {args.out_dir} ({args.format} format)'
    )
    return 0


def upload(args: argparse.Namespace) -> int:
    """Uploads the written Hugging Face folder to the Hub.

    Raises:
        StorageFault: the upload failed (huggingface_hub's own errors: network, auth), in one line.
    """
    from cdcd_composer.hf.folder import push_to_hub

    try:
        print(f'uploaded to {push_to_hub(args.out_dir, args.push_to_hub, args.private)}')
    except Exception as e:  # huggingface_hub raises its own errors (network, auth) with long texts
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise StorageFault(
            f'uploading {args.out_dir} to {args.push_to_hub} failed ({first}); the folder is written: log in '
            '(huggingface-cli login) and rerun, or upload it with huggingface-cli upload'
        ) from None
    return 0
