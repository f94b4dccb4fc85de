"""Weights-only export: safetensors + JSON config + tokenizer + fitted time warp.

`generate.py` and `eval.py` load an export without unpickling anything. Training writes one at
the end of `fit` (the `ExportWeights` callback); any Composer checkpoint can be exported with

    python -m cdcd_composer.export CHECKPOINT OUT_DIR [--trust_checkpoint]

OUT_DIR may be a local directory or an object-store URI (`s3://bucket/runs/x/export`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from transformers import PreTrainedTokenizerFast

from cdcd_composer.checkpoint import (
    EXPORT_CONFIG,
    EXPORT_TOKENIZER,
    EXPORT_WEIGHTS,
    WARP_PREFIX,
    TrainedModel,
    file_sha256,
    load_trained_model,
)
from cdcd_composer.dataset_store import DatasetRoot, check_writable
from cdcd_composer.time_warping import TimeWarp
from cdcd_composer.tokenization import tokenizer_from_json

EXPORT_FORMAT = 1


def split_folder(out: str) -> tuple[str, str]:
    """('runs/x', 'export') for 'runs/x/export'; ('.', 'export') for a bare name."""
    out = out.rstrip('/')
    return tuple(out.rsplit('/', 1)) if '/' in out else ('.', out)  # type: ignore[return-value]


def write_export(
    out: str,
    metadata: dict[str, Any],
    weights: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerFast,
    warp: TimeWarp | None,
) -> None:
    """Writes an export to `out` (local or object store), replacing an older one atomically.

    Args:
        out: Directory or URI.
        metadata: RunMetadata (model, diffusion, dataset, tokenizer, self_conditioning).
        weights: The denoiser's state dict (full, unsharded), on any device.
        tokenizer: The training tokenizer.
        warp: The fitted time warp, or None when training sampled t uniformly.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to('cpu').contiguous() for k, v in weights.items()}
    config: dict[str, Any] = {'format': EXPORT_FORMAT, 'metadata': metadata, 'time_warp': None}
    if warp is not None:
        config['time_warp'] = warp.config()
        tensors |= {WARP_PREFIX + k: v.contiguous() for k, v in warp.state_dict().items()}
    parent, name = split_folder(out)
    root = DatasetRoot(parent)
    with root.staged_directory(name) as staging:
        save_file(tensors, os.path.join(staging, EXPORT_WEIGHTS))
        # Verified on load: a damaged weights file would otherwise load and sample garbage.
        config['weights_sha256'] = file_sha256(os.path.join(staging, EXPORT_WEIGHTS))
        tokenizer.save_pretrained(os.path.join(staging, EXPORT_TOKENIZER))
        with open(os.path.join(staging, EXPORT_CONFIG), 'w') as f:
            json.dump(config, f, indent=2)


def export_trained_model(trained: TrainedModel, out: str) -> None:
    """Exports a loaded model (e.g. from a Composer checkpoint)."""
    warp = trained.time_distribution if trained.fitted_warp else None
    write_export(out, trained.metadata, trained.model.state_dict(), trained.tokenizer, warp)


class ExportWeights(Callback):
    """Writes a weights-only export when training ends (`FIT_END`).

    Under FSDP every rank takes part in gathering the full state dict; rank 0 writes it.

    Args:
        folder: Destination, formatted with `{run_name}` (local path or object-store URI).
    """

    def __init__(self, folder: str = 'runs/{run_name}/export') -> None:
        self.folder = folder

    def fit_start(self, state: State, logger: Logger) -> None:
        """Checks the destination before training, not after it: writable, and ours to replace."""
        if dist.get_global_rank() == 0:
            out = self.folder.format(run_name=state.run_name)
            check_writable(out, 'callbacks.export_weights.folder')
            parent, name = split_folder(out)
            DatasetRoot(parent).check_replaceable(name)

    def fit_end(self, state: State, logger: Logger) -> None:
        """Gathers the weights and writes the export."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from cdcd_composer.callbacks import RunMetadata, TimeWarpRefit
        from cdcd_composer.composer_model import unwrap_model

        if state.fsdp_enabled:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(state.model, options=options)
        else:
            weights = unwrap_model(state.model).state_dict()
        if dist.get_global_rank() == 0:
            metadata = next(cb for cb in state.callbacks if isinstance(cb, RunMetadata)).metadata
            model = unwrap_model(state.model)
            refitted = any(isinstance(cb, TimeWarpRefit) for cb in state.callbacks)
            warp = model.time_distribution if refitted else None  # Else t was uniform.
            prefix = 'model.'
            inner = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            out = self.folder.format(run_name=state.run_name)
            write_export(out, metadata, inner, tokenizer_from_json(metadata['tokenizer']), warp)
            logger.log_hyperparameters({'export_folder': out})
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    """`python -m cdcd_composer.export CHECKPOINT OUT_DIR [--trust_checkpoint]`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='a .pt checkpoint written by train.py (local or object store)')
    p.add_argument('out_dir', help='where the export goes (local directory or object-store URI)')
    p.add_argument('--trust_checkpoint', action='store_true', help='unpickle even from an untrusted location')
    args = p.parse_args(argv)
    try:
        trained = load_trained_model(args.checkpoint, trust=args.trust_checkpoint)
        export_trained_model(trained, args.out_dir)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'exported {args.checkpoint} to {args.out_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
