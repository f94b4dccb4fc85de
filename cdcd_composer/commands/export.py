"""Exports a Composer checkpoint as a weights-only export (safetensors + JSON + tokenizer).

    python export.py runs/x/checkpoints/latest-rank0.pt runs/x/export
    python export.py s3://bucket/runs/x/checkpoints/ep0-ba800-rank0.pt s3://bucket/x/export

The export loads without unpickling anything (`generate.py`, `eval.py`).
"""

from __future__ import annotations

import argparse
import sys

from cdcd_composer.checkpoints.loading import add_loading_arguments, load_trained_model
from cdcd_composer.export import write_export


def main(argv: list[str] | None = None) -> int:
    """`python export.py CHECKPOINT OUT_DIR [--trust_checkpoint]`; failures are one line on stderr."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='a .pt checkpoint written by train.py (local or object store)')
    p.add_argument('out_dir', help='where the export goes (local directory or object-store URI)')
    add_loading_arguments(p)
    args = p.parse_args(argv)
    try:
        model = load_trained_model(args.checkpoint, trust=args.trust_checkpoint, weights=args.weights)
        write_export(args.out_dir, model.state_dict(), args.weights)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'exported {args.checkpoint} ({model.spec.weights} weights) to {args.out_dir}')
    return 0
