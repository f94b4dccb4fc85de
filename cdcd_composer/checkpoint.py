"""Loading a trained denoiser, tokenizer and time warp from an export or a Composer checkpoint.

The export (`cdcd_composer.export`: safetensors + JSON + tokenizer) loads without unpickling
anything. A Composer `.pt` checkpoint is a pickle, which can run arbitrary code when loaded; it
is loaded only from a trusted location (a local file owned by you and writable by no one else)
or when the caller says it trusts it (`--trust_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from cdcd_composer.dataset_store import DatasetRoot, is_remote
from cdcd_composer.model import CDCDConfig, CDCDTransformer
from cdcd_composer.time_warping import TimeWarp
from cdcd_composer.tokenization import load_tokenizer, tokenizer_from_json

EXPORT_CONFIG = 'cdcd_config.json'
EXPORT_WEIGHTS = 'model.safetensors'
EXPORT_TOKENIZER = 'tokenizer'
WARP_PREFIX = 'time_warp.'


@dataclass
class TrainedModel:
    """Everything sampling and export need."""

    model: CDCDTransformer
    tokenizer: PreTrainedTokenizerFast
    time_distribution: TimeWarp
    metadata: dict[str, Any]  # RunMetadata: model, diffusion, dataset, tokenizer, self_conditioning.
    fitted_warp: bool  # Whether `time_distribution` is a fitted curve (False: uniform t).

    @property
    def dataset(self) -> dict[str, Any]:
        """The training data's metadata (seq_len, ids, layout, source)."""
        return self.metadata['dataset']

    @property
    def seq_len(self) -> int:
        """Canvas length."""
        return self.dataset['seq_len']

    @property
    def eos_id(self) -> int:
        """End-of-story token id."""
        return self.dataset['eos_id']

    @property
    def source(self) -> str:
        """Dataset source ('synthetic' means the grammar recogniser applies)."""
        return self.dataset['source']

    @property
    def self_conditioned(self) -> bool:
        """Trained with self-conditioning: sampling should feed x0_hat back."""
        return bool(self.metadata.get('self_conditioning'))


def build_trained_model(
    metadata: dict[str, Any],
    weights: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerFast,
    warp_config: dict[str, Any] | None,
    warp_state: dict[str, torch.Tensor] | None,
    device: str = 'cpu',
    warp: bool = True,
) -> TrainedModel:
    """Assembles a `TrainedModel`; `warp=False` (or no fitted curve) samples t uniformly."""
    model = CDCDTransformer(CDCDConfig(**metadata['model']))
    model.load_state_dict(weights)
    model.to(device).eval()
    diffusion = metadata['diffusion']
    time_distribution = TimeWarp(diffusion['t_min'], diffusion['t_max'])
    fitted = warp and warp_config is not None and warp_state is not None
    if fitted:
        time_distribution = TimeWarp.from_config(warp_config)
        time_distribution.load_state_dict(warp_state)
    return TrainedModel(model, tokenizer, time_distribution, metadata, fitted)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_export_config(local: str, where: str) -> dict[str, Any]:
    """The export's JSON config, checked for its keys and for the weights' checksum.

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    config_path = os.path.join(local, EXPORT_CONFIG)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f'{where}/{EXPORT_CONFIG} is unreadable ({e}); export the checkpoint again'
        ) from None
    expected = {'format', 'metadata', 'time_warp', 'weights_sha256'}
    keys = set(config) if isinstance(config, dict) else set()
    if not isinstance(config, dict) or not {'format', 'metadata'} <= keys or keys - expected:
        raise ValueError(
            f'{where}/{EXPORT_CONFIG} is not an export config (keys {sorted(keys)}, expected '
            f'{sorted(expected)}); export the checkpoint again with python -m cdcd_composer.export'
        )
    for name in ('model', 'diffusion', 'dataset', 'tokenizer'):
        if not isinstance(config['metadata'], dict) or name not in config['metadata']:
            raise ValueError(f'{where}/{EXPORT_CONFIG} lacks metadata.{name}; export the checkpoint again')
    weights = os.path.join(local, EXPORT_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(f'{where}/{EXPORT_WEIGHTS} is missing; the export is incomplete: export it again')
    if 'weights_sha256' in config and file_sha256(weights) != config['weights_sha256']:
        raise ValueError(
            f'{where}/{EXPORT_WEIGHTS} does not match the checksum in {EXPORT_CONFIG}: the file is '
            'damaged or was replaced; export the checkpoint again'
        )
    return config


def load_export(path: str, device: str = 'cpu', warp: bool = True) -> TrainedModel:
    """Loads a weights-only export (local directory or object-store prefix); unpickles nothing.

    The weights are checked against the SHA-256 in the config (exports written before the
    checksum existed load without the check).

    Raises:
        ValueError: `path` holds no export, or a damaged or inconsistent one.
    """
    from safetensors.torch import load_file

    root = DatasetRoot(path)
    if not root.exists(EXPORT_CONFIG):
        raise ValueError(
            f'{path} is neither a .pt checkpoint nor an export directory (no {EXPORT_CONFIG}); '
            'pass a checkpoint from train.py or an export from python -m cdcd_composer.export'
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = root.fetch_directory('', tmp) if is_remote(path) else path
        config = read_export_config(local, path.rstrip('/'))
        tensors = load_file(os.path.join(local, EXPORT_WEIGHTS))
        tokenizer = load_tokenizer(os.path.join(local, EXPORT_TOKENIZER))
    weights = {k: v for k, v in tensors.items() if not k.startswith(WARP_PREFIX)}
    warp_state = {k[len(WARP_PREFIX) :]: v for k, v in tensors.items() if k.startswith(WARP_PREFIX)}
    return build_trained_model(
        config['metadata'], weights, tokenizer, config.get('time_warp'), warp_state or None, device, warp
    )


def _ancestors(path: str) -> list[str]:
    """The directories above `path`, nearest first, up to the root."""
    found, current = [], os.path.dirname(path)
    while True:
        found.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            return found
        current = parent


def _unsafe_directory(directory: str) -> str | None:
    """Why others could swap what `directory` holds (None: only you or root can).

    As ssh checks the path to its keys: owned by you or root, and writable by no one else,
    unless the sticky bit keeps others from replacing your files (as in /tmp).
    """
    info = os.stat(directory)
    if hasattr(os, 'getuid') and info.st_uid not in (os.getuid(), 0):
        return f'its directory {directory} is owned by another user'
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        return f'others can write to its directory {directory}'
    return None


def untrusted_reason(path: str, info: os.stat_result | None = None) -> str | None:
    """Why a pickle at `path` is not trusted by default (None: a local file only you can write).

    Args:
        path: Local path or object-store URI.
        info: `os.fstat` of the already opened file, so the file checked is the file loaded
            (default: `os.stat(path)`).
    """
    if is_remote(path):
        return 'it comes from an object store'
    info = os.stat(path) if info is None else info
    if hasattr(os, 'getuid') and info.st_uid != os.getuid():
        return 'it is owned by another user'
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return 'others can write to it'
    # The link's directories and the target's: either lets someone else swap the file.
    for directory in dict.fromkeys(_ancestors(os.path.abspath(path)) + _ancestors(os.path.realpath(path))):
        reason = _unsafe_directory(directory)
        if reason:
            return reason
    return None


def refusal(path: str, reason: str, flag: str = '--trust_checkpoint') -> ValueError:
    """The one-line refusal to unpickle `path`, naming the way out."""
    return ValueError(
        f'refusing to unpickle {path} because {reason}: a pickle can run arbitrary code. Pass {flag} if '
        'you trust it, or use a weights-only export (python -m cdcd_composer.export CHECKPOINT OUT_DIR)'
    )


def load_local_pickle(path: str, trust: bool) -> Any:
    """Unpickles a local checkpoint, checking the very file it reads.

    The file is opened once; ownership and permissions are checked on that descriptor
    (`fstat`) and the pickle is read from it, so a file swapped in after the check is never
    loaded.

    Raises:
        ValueError: untrusted and not `trust`.
    """
    with open(os.path.realpath(path), 'rb') as f:
        reason = untrusted_reason(path, os.fstat(f.fileno()))
        if reason and not trust:
            raise refusal(path, reason)
        return unpickle(f, path)


def unpickle(source: Any, path: str) -> Any:
    """`torch.load` of a full checkpoint; a file that is not one fails in one line naming it."""
    try:
        return torch.load(source, map_location='cpu', weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise ValueError(
            f'{path} is not a PyTorch checkpoint ({first}); pass a .pt written by train.py or an export '
            'directory'
        ) from None


def load_composer_checkpoint(
    path: str, device: str = 'cpu', warp: bool = True, trust: bool = False
) -> TrainedModel:
    """Builds the denoiser from a full (monolithic) Composer checkpoint written by `train.py`.

    Raises:
        ValueError: missing, untrusted without `trust`, or not written by this recipe's `train.py`.
    """
    if not is_remote(path) and not os.path.isfile(path):
        raise ValueError(f'checkpoint {path!r} not found; pass a .pt file or an export directory')
    if is_remote(path):
        if not trust:
            raise refusal(path, untrusted_reason(path) or '')
        from composer.utils import get_file

        with tempfile.TemporaryDirectory() as workdir:
            local = os.path.join(workdir, os.path.basename(path))
            get_file(path, local, progress_bar=False)
            state: dict[str, Any] = unpickle(local, path)
    else:
        state = load_local_pickle(path, trust)
    try:
        metadata = state['state']['callbacks']['RunMetadata']['metadata']
        weights = state['state']['model']
    except (KeyError, TypeError):
        raise ValueError(
            f'{path!r} is not a cdcd-composer checkpoint (no RunMetadata); use one from train.py'
        ) from None
    prefix = 'model.'
    weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    refit = state['state']['callbacks'].get('TimeWarpRefit') or {}
    warp_config = None
    if refit.get('warp') is not None:
        diffusion = metadata['diffusion']
        warp_config = {'t_min': diffusion['t_min'], 't_max': diffusion['t_max'], **refit['warp_kwargs']}
    tokenizer = tokenizer_from_json(metadata['tokenizer'])
    return build_trained_model(metadata, weights, tokenizer, warp_config, refit.get('warp'), device, warp)


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
    path: str, device: str = 'cpu', warp: bool = True, trust: bool = False
) -> TrainedModel:
    """A weights-only export (directory or prefix) or a Composer `.pt` checkpoint, local or remote.

    Args:
        path: Export directory, `.pt` file, or their object-store URIs.
        device: Where to put the model.
        warp: Use the fitted time warp (False: uniform t, for comparison).
        trust: Unpickle a `.pt` checkpoint even from an untrusted location.
    """
    check_device(device)
    if path.endswith('.pt') or (not is_remote(path) and os.path.isfile(path)):
        return load_composer_checkpoint(path, device, warp, trust)
    return load_export(path, device, warp)
