"""The weights-only export: a trained `CDCDDiffusion` saved without pickles.

    OUT/model.safetensors   the model's state dict: denoiser weights and time-warp tensors
    OUT/cdcd_config.json    the run spec (which says whether the weights are the EMA or the raw
                            ones), the format version, the weights' SHA-256 and, where known,
                            how long the model trained (`training`: batches, samples, tokens)
    OUT/tokenizer/          the training tokenizer (also inside the spec; here for other tools)

`generate.py` and `eval.py` load it without unpickling anything. Training writes one when it
ends (the `FinalExport` callback); `python export.py CHECKPOINT OUT_DIR` exports a checkpoint.
OUT may be a local directory or an object-store URI (`s3://bucket/runs/x/export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch

from cdcd_composer.arguments import WEIGHT_CHOICES
from cdcd_composer.diffusion import EMA_KEY, WARP_PREFIX, CDCDDiffusion
from cdcd_composer.run_spec import RunSpec
from cdcd_composer.storage import Folder, is_remote

log = logging.getLogger(__name__)

EXPORT_CONFIG = 'cdcd_config.json'
EXPORT_WEIGHTS = 'model.safetensors'
EXPORT_TOKENIZER = 'tokenizer'
EXPORT_FORMAT = 2  # bumped when the export's layout changes; a reader accepts its own only
EXTRA_STATE = '_extra_state'  # The state-dict key of the run spec (`CDCDDiffusion.get_extra_state`).
PROGRESS_UNITS = ('batch', 'sample', 'token')  # what `training` counts


def training_progress(timestamp: Any) -> dict[str, int]:
    """{'batch': .., 'sample': .., 'token': ..} trained, from a Composer `Timestamp` or its state dict."""
    if not isinstance(timestamp, dict):
        return {unit: int(getattr(timestamp, unit).value) for unit in PROGRESS_UNITS}
    counts = timestamp.get('Timestamp', timestamp)
    return {unit: int(counts[unit]) for unit in PROGRESS_UNITS if unit in counts}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str, name: str, fix: str) -> Any:
    """The JSON in `path`.

    Raises:
        ValueError: one line, `{name} is unreadable (why); {fix}`.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{name} is unreadable ({e}); {fix}') from None


def split_folder(out: str) -> tuple[str, str]:
    """('runs/x', 'export') for 'runs/x/export'; ('.', 'export') for a bare name."""
    out = out.rstrip('/')
    return tuple(out.rsplit('/', 1)) if '/' in out else ('.', out)  # type: ignore[return-value]


def model_from_state(state: dict[str, Any], where: str, weights: str = 'ema') -> CDCDDiffusion:
    """Builds the model a full state dict describes and loads it (the spec is its `_extra_state`).

    Args:
        state: A full model state dict (a checkpoint's or an export's).
        where: Where it came from, for messages.
        weights: 'ema' or 'raw' (see `select_weights`); the model's spec records the choice.

    Raises:
        ValueError: the state has no run spec: it is not a cdcd-composer model's.
    """
    if EXTRA_STATE not in state or f'{WARP_PREFIX}masses' not in state:
        raise ValueError(
            f'{where} has no run spec in its model state: it is not a cdcd-composer checkpoint; pass one '
            'written by train.py'
        )
    state = select_weights(state, weights, where)
    spec = RunSpec.from_json(state[EXTRA_STATE])
    model = CDCDDiffusion.from_spec(spec, n_bins=state[f'{WARP_PREFIX}masses'].numel())
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:  # missing, unexpected or misshapen tensors
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:150]
        raise ValueError(
            f'{where}: its tensors do not fit its run spec ({type(e).__name__}: {detail}); export the '
            'checkpoint again'
        ) from None
    return model.eval()


def select_weights(state: dict[str, Any], weights: str, where: str) -> dict[str, Any]:
    """A model state dict with one set of weights, its run spec saying which ('ema' or 'raw').

    Args:
        state: A full `CDCDDiffusion` state dict: from training (the weights and, with
            `algorithms.ema`, their averages under `ema`) or from an export (one set).
        weights: 'ema': the averages where the run kept them, else the raw weights; 'raw': the
            weights as trained.
        where: What the state came from, for messages.

    Raises:
        ValueError: an unknown choice, or 'raw' from a state that holds only the averages.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f'weights={weights!r} is not one of {", ".join(WEIGHT_CHOICES)}')
    state = dict(state)
    averages = state.pop(EMA_KEY, None)
    spec = RunSpec.from_json(state[EXTRA_STATE])
    if averages is None:  # One set already: the spec says which.
        if weights == 'raw' and spec.weights == 'ema':
            raise ValueError(
                f'{where} holds only the EMA weights; export the training checkpoint again with --weights raw'
            )
        if weights == 'ema' and spec.weights == 'raw':
            log.info('%s holds no averaged weights (trained without algorithms.ema): the raw ones', where)
        return check_finite(state, where)
    if weights == 'ema':
        state.update(averages)
    return check_finite({**state, EXTRA_STATE: dataclasses.replace(spec, weights=weights).to_json()}, where)


def check_finite(state: dict[str, Any], where: str) -> dict[str, Any]:
    """`state`, once every floating tensor in it is finite (NaN or inf weights sample garbage).

    Raises:
        ValueError: one line naming the first non-finite tensor and the way out.
    """
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f'{where}: {name} holds NaN or inf (the run diverged there); use an earlier checkpoint'
            )
    return state


def tensor_bytes(values: Iterable[Any]) -> int:
    """The bytes of the tensors among `values` (a state dict's), whole (a DTensor counts all its shards)."""
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


def export_size(values: Iterable[Any], vocab_size: int) -> int:
    """About how many bytes an export of a state dict's `values` takes, with its tokenizer and files.

    Measured: a tokenizer takes about 25 bytes a token; the JSON, model code and card under 100 KB.
    """
    return tensor_bytes(values) + 64 * vocab_size + 200_000


def write_export(
    out: str, state: dict[str, Any], weights: str = 'ema', training: dict[str, int] | None = None
) -> None:
    """Writes a model's full state dict to `out` (local or object store), replacing an older one atomically.

    Args:
        out: Directory or URI.
        state: `CDCDDiffusion.state_dict()` (full, unsharded; tensors on any device).
        weights: 'ema': the moving averages when the state holds them (else the raw weights);
            'raw': the weights as trained. The spec in the export records the choice.
        training: How long the model trained (`training_progress`), when known.
    """
    from safetensors.torch import save_file

    state = select_weights(state, weights, out)
    spec = RunSpec.from_json(state[EXTRA_STATE])
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    parent, name = split_folder(out)
    with Folder(parent).staged_directory(
        name, export_size(tensors.values(), spec.model.vocab_size), 'the export'
    ) as staging:
        save_file(tensors, os.path.join(staging, EXPORT_WEIGHTS))
        config = {
            'format': EXPORT_FORMAT,
            'spec': state[EXTRA_STATE],
            # Verified on load: a damaged weights file would otherwise load and sample garbage.
            'weights_sha256': file_sha256(os.path.join(staging, EXPORT_WEIGHTS)),
        }
        if training:
            config['training'] = training
        if spec.tokenizer is not None:
            spec.text_tokenizer.save_pretrained(os.path.join(staging, EXPORT_TOKENIZER))
        with open(os.path.join(staging, EXPORT_CONFIG), 'w') as f:
            json.dump(config, f, indent=2)


def read_export_config(local: str, where: str) -> dict[str, Any]:
    """The export's JSON config, checked for its keys and for the weights' checksum.

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    config = read_json(
        os.path.join(local, EXPORT_CONFIG), f'{where}/{EXPORT_CONFIG}', 'export the checkpoint again'
    )
    expected = {'format', 'spec', 'weights_sha256'}
    keys = set(config) if isinstance(config, dict) else set()
    if not expected <= keys <= expected | {'training'}:
        raise ValueError(
            f'{where}/{EXPORT_CONFIG} is not an export config (keys {sorted(keys)}, expected '
            f'{sorted(expected)}); export the checkpoint again with python export.py'
        )
    if config['format'] != EXPORT_FORMAT:
        raise ValueError(
            f'{where}/{EXPORT_CONFIG} is of export format {config["format"]!r}, this version reads '
            f'{EXPORT_FORMAT}; export the checkpoint again with python export.py'
        )
    try:
        RunSpec.from_json(config['spec'])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f'{where}/{EXPORT_CONFIG} holds no valid run spec ({type(e).__name__}: {e}); '
            'export the checkpoint again'
        ) from None
    weights = os.path.join(local, EXPORT_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(f'{where}/{EXPORT_WEIGHTS} is missing; the export is incomplete: export it again')
    if file_sha256(weights) != config['weights_sha256']:
        raise ValueError(
            f'{where}/{EXPORT_WEIGHTS} does not match the checksum in {EXPORT_CONFIG}: the file is '
            'damaged or was replaced; export the checkpoint again'
        )
    return config


def load_export(path: str, weights: str = 'ema') -> CDCDDiffusion:
    """Loads a weights-only export (local directory or object-store prefix); unpickles nothing.

    `weights='raw'` refuses an export that holds only the averaged weights.

    Raises:
        ValueError: `path` holds no export, or a damaged or inconsistent one.
    """
    from safetensors.torch import load_file

    root = Folder(path)
    if not root.exists(EXPORT_CONFIG):
        raise ValueError(
            f'{path} is neither a .pt checkpoint nor an export directory (no {EXPORT_CONFIG}); '
            'pass a checkpoint from train.py or an export from python export.py'
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = root.fetch_directory('', tmp) if is_remote(path) else path
        config = read_export_config(local, path.rstrip('/'))
        try:
            state: dict[str, Any] = load_file(os.path.join(local, EXPORT_WEIGHTS))
        except (
            Exception
        ) as e:  # safetensors raises its own SafetensorError (no public class) for a bad header
            raise ValueError(
                f'{path}/{EXPORT_WEIGHTS} is no readable safetensors file ({str(e)[:120]}); export the '
                'checkpoint again'
            ) from None
    model = model_from_state({**state, EXTRA_STATE: config['spec']}, path, weights)
    model.trained = config.get('training')
    return model
