"""Loading a trained model from an export or a Composer checkpoint, local or on an object store.

Both hold the state of one `CDCDDiffusion` (weights, time warp, run spec). An export loads
without unpickling anything; a Composer `.pt` checkpoint is a pickle, read by the weights-only
unpickler (see `cdcd_composer.checkpoints.trust`), from anywhere.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import torch

from cdcd_composer import workarounds
from cdcd_composer.checkpoints.trust import load_checkpoint_file, untrusted_cause
from cdcd_composer.diffusion import CDCDDiffusion
from cdcd_composer.export import load_export, model_from_state, training_progress
from cdcd_composer.storage import is_remote
from cdcd_composer.time_warping import TimeWarp

# The checkpoints Composer saves: `ep0-ba800-rank0.pt` (one file) or `ep0-ba800` (a sharded folder).
CHECKPOINT_NAME = re.compile(r'ep(\d+)-ba(\d+)-rank0\.pt$|ep(\d+)-ba(\d+)$')


def load_composer_checkpoint(path: str, trust: bool = False, weights: str = 'ema') -> CDCDDiffusion:
    """The model in a Composer checkpoint written by `train.py`: a `.pt` file or a sharded folder.

    `weights`: 'ema', the averaged weights where the run kept them (else the raw ones), or 'raw'.

    Raises:
        ValueError: missing, holding types outside the allowlist without `trust`, or not written by
            this recipe's `train.py`.
    """
    if is_remote(path) and is_sharded_checkpoint(path):
        raise ValueError(
            f'{path} is a sharded checkpoint in an object store, which is read in place only locally: '
            "download its folder, or pass the run's export"
        )
    if is_remote(path):
        from composer.utils import get_file

        with tempfile.TemporaryDirectory() as workdir:
            local = os.path.join(workdir, os.path.basename(path))
            get_file(path, local, progress_bar=False)
            checkpoint = load_checkpoint_file(local, path, trust)
    elif not os.path.exists(path) or not (os.path.isfile(path) or is_sharded_checkpoint(path)):
        raise ValueError(f'checkpoint {path!r} not found; pass a .pt file or an export directory')
    elif is_sharded_checkpoint(path):
        checkpoint: dict[str, Any] = load_sharded_checkpoint(path, trust)
    else:
        checkpoint = load_checkpoint_file(path, path, trust)
    try:
        state = checkpoint['state']['model']
    except (KeyError, TypeError):
        raise ValueError(
            f'{path!r} is not a Composer checkpoint (no model state); use one from train.py'
        ) from None
    model = model_from_state(state, path, weights)
    timestamp = checkpoint['state'].get('timestamp')
    model.trained = training_progress(timestamp) if isinstance(timestamp, dict) else None
    return model


def is_sharded_checkpoint(path: str) -> bool:
    """A sharded (distributed-checkpoint) checkpoint: the one rule for loading, resuming and FSDP.

    Local: a folder holding `.metadata` (written after its shards), or the `latest-rank0.pt` link
    to one. In an object store, where folders are prefixes (a URI, or the key a remote pointer
    holds): a key named like Composer's sharded folders (`.../ep0-ba800`).
    """
    if not is_remote(path) and os.path.exists(path):
        return os.path.isfile(os.path.join(path, '.metadata'))
    # An object-store URI, or a key as a remote `latest-rank0.pt.symlink` holds it.
    return not path.endswith('.pt') and CHECKPOINT_NAME.search(path.rstrip('/')) is not None


def load_sharded_checkpoint(path: str, trust: bool) -> dict[str, Any]:
    """A sharded checkpoint folder (every rank's shards) gathered into one full checkpoint dict.

    Its files hold pickles too, read without running code (`workarounds.weights_only_sharded_loads`).

    Raises:
        ValueError: it holds types outside the allowlists and not `trust`, or the folder is damaged.
    """
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    workarounds.weights_only_sharded_loads(trust)
    folder = os.path.realpath(path)
    with tempfile.TemporaryDirectory() as workdir:
        full = os.path.join(workdir, 'checkpoint.pt')
        try:
            dcp_to_torch_save(folder, full)
        except (Exception, CheckpointException) as e:  # DCP raises many kinds for a damaged folder
            if untrusted_cause(e):
                raise untrusted_cause(e) from None
            first = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
            raise ValueError(f'{path} is not a readable sharded checkpoint ({first}); use another') from None
        return load_checkpoint_file(full, path, trust)


def check_device(device: str) -> None:
    """Fails in one line, before anything loads, on a device this machine does not have."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f'--device {device!r} is not a device name; use cpu or cuda') from None
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {device} but no CUDA GPU is visible here; use --device cpu')
    if kind not in ('cpu', 'cuda'):
        raise ValueError(f'--device {device!r} is not supported; use cpu or cuda')


def load_trained_model(
    path: str, device: str = 'cpu', warp: bool = True, trust: bool = False, weights: str = 'ema'
) -> CDCDDiffusion:
    """A weights-only export (directory or prefix) or a Composer `.pt` checkpoint, local or remote.

    Args:
        path: Export directory, `.pt` file, or their object-store URIs.
        device: Where to put the model.
        warp: Keep the fitted time warp (False: a uniform one, for comparison).
        trust: Fully unpickle a `.pt` checkpoint that holds types outside the allowlist.
        weights: 'ema': the moving averages where the run kept them (else the raw weights);
            'raw': the weights as trained. `model.spec.weights` says which were loaded.

    Returns:
        The model in eval mode. On a GPU, float32 matmuls (the sampler's and evaluation's, which
        run without autocast) are allowed TF32 from here on (`torch.set_float32_matmul_precision`).
    """
    check_device(device)
    if torch.device(device).type == 'cuda':
        torch.set_float32_matmul_precision('high')
    if path.endswith('.pt') or is_sharded_checkpoint(path) or (not is_remote(path) and os.path.isfile(path)):
        model = load_composer_checkpoint(path, trust, weights)
    else:
        model = load_export(path, weights)
    if not warp:
        model.time_warp = TimeWarp(model.spec.t_min, model.spec.t_max)
    return model.to(device).eval()
