"""Reading pickled checkpoints without letting them run code.

A Composer `.pt` checkpoint is a pickle, and unpickling can call any function the file names,
wherever the file came from. So every read of one, ours and Composer's (autoresume, `load_path`,
`generate.py`, `eval.py`, `export.py`), goes through torch's weights-only unpickler
(`torch.load(weights_only=True)`): it builds tensors, containers, numbers and strings, plus the
few types this recipe's checkpoints hold (`checkpoint_globals`: numpy arrays of the RNG states,
a timedelta, torch's version string), and refuses a file that names anything else. Only then
does the trust flag (`--trust_checkpoint`, `trust_checkpoint=true`) matter: it allows a full
unpickle of such a file, for one you wrote with other types and trust.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import zipfile
from typing import IO, Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

NUMPY_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                np.float16, np.float32, np.float64)  # fmt: skip


def checkpoint_globals() -> list[Any]:
    """The types beyond torch's own that a Composer checkpoint of this recipe holds.

    numpy arrays (the RNG states Composer saves), their numeric dtypes, `datetime.timedelta` (the
    run's wall clock) and `TorchVersion` (the metadata). None of them can call code when built.
    """
    from numpy._core.multiarray import _reconstruct

    dtypes = [type(np.dtype(kind)) for kind in NUMPY_DTYPES]
    return [np.ndarray, np.dtype, _reconstruct, *dtypes, datetime.timedelta, TorchVersion]


class UntrustedCheckpoint(ValueError):
    """The one-line refusal to unpickle `path` because of `reason`, naming the way out (`flag`)."""

    def __init__(self, path: str, reason: str, flag: str) -> None:
        self.reason, self.flag = reason, flag
        super().__init__(
            f'refusing to unpickle {path} because {reason}: a pickle can run arbitrary code. Pass {flag} '
            'only if you trust it, or use a weights-only export (python export.py CHECKPOINT OUT_DIR)'
        )


def untrusted_cause(error: BaseException) -> UntrustedCheckpoint | None:
    """The refusal inside `error`, if any.

    Itself, in its cause chain, or among the per-rank failures of a `torch.distributed.checkpoint`
    `CheckpointException` (whose items are (exception, stack) pairs).
    """
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UntrustedCheckpoint):
            return current
        pending += [current.__cause__, current.__context__]
        for failure in getattr(current, 'failures', {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def refusal(path: str, reason: str, flag: str = '--trust_checkpoint') -> UntrustedCheckpoint:
    """The one-line refusal to unpickle `path`, naming the way out."""
    return UntrustedCheckpoint(path, reason, flag)


def outside_allowlist(path: str) -> list[str]:
    """The globals a local `torch.save` file names beyond the checkpoint allowlist.

    Read without unpickling. Empty: weights-only loading accepts it (or it is no zip archive, and
    loading it says what it is).
    """
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError):
        return []  # not a zip checkpoint: loading it says what it is
    allowed = {f'{g.__module__}.{g.__qualname__}' for g in checkpoint_globals()}
    return [name for name in named if name not in allowed]


def load_checkpoint_file(
    source: str | IO[bytes], path: str, trust: bool, flag: str = '--trust_checkpoint'
) -> Any:
    """`torch.load` of a full checkpoint, weights-only unless `trust`.

    Args:
        source: A local file path or an open binary file.
        path: The name to report (a local path or the object-store URI it came from).
        trust: Allow a full unpickle of a file holding types outside the allowlist.
        flag: The way to say `trust`, for the refusal.

    Raises:
        ValueError: one line: the file names types outside the allowlist (and not `trust`), or it
            is no PyTorch checkpoint.
    """
    try:
        return weights_only_load(source, path, trust, flag)
    except (UntrustedCheckpoint, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler raise any kind (KeyError, struct.error...)
        raise not_a_checkpoint(path, e) from None


def weights_only_load(source: str | IO[bytes], path: str, trust: bool, flag: str) -> Any:
    """`torch.load` to the CPU, weights-only with the allowlist unless `trust`.

    Raises:
        ValueError: the file names a type outside the allowlist and not `trust` (one line).
        Whatever `torch.load` raises for a damaged file.
    """
    if trust:
        return torch.load(source, map_location='cpu', weights_only=False)
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(source, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = forbidden_global(e, source)
        if not found:  # not a forbidden type: a damaged file
            raise
        raise refusal(path, f'it holds {found}, outside the checkpoint allowlist', flag) from None


def forbidden_global(error: pickle.UnpicklingError, source: str | IO[bytes]) -> str | None:
    """What a weights-only refusal refused, whatever torch's wording, or None for a damaged file.

    torch names the global in several phrasings ("GLOBAL builtins.exec was not an allowed global",
    "unsupported GLOBAL posix.system whose module posix is blocked", "... but got <class>"); a local
    file is also asked directly, without unpickling (`outside_allowlist`).
    """
    found = re.search(r'GLOBAL (\S+)|but got (.+)|call reduce for (\S+)', str(error))
    if found:
        return next(g for g in found.groups() if g).strip()
    if isinstance(source, (str, os.PathLike)):
        return ', '.join(outside_allowlist(str(source))) or None
    return None


def not_a_checkpoint(path: str, error: Exception) -> ValueError:
    """The one-line error for a file that is no PyTorch checkpoint."""
    first = (
        f'{type(error).__name__}: {str(error).splitlines()[0][:100]}' if str(error) else type(error).__name__
    )
    return ValueError(
        f'{path} is not a PyTorch checkpoint ({first}); pass a .pt written by train.py or an export directory'
    )


DCP_METADATA_GLOBALS = {
    *(('torch.distributed.checkpoint.metadata', name) for name in (
        'Metadata', 'MetadataIndex', 'StorageMeta', 'TensorProperties', 'TensorStorageMetadata',
        'BytesStorageMetadata', 'ChunkStorageMetadata', '_MEM_FORMAT_ENCODING')),
    ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'),
    ('torch.serialization', '_get_layout'), ('pathlib', 'PosixPath'),
}  # fmt: skip


class DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a sharded checkpoint's `.metadata`: DCP's own dataclasses, sizes and dtypes only."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowlisted class `module.name`; anything else is refused (nothing is imported)."""
        if (module, name) in DCP_METADATA_GLOBALS or (
            module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        where = getattr(self, 'path', '.metadata')
        raise refusal(where, f'it holds {module}.{name}, outside the sharded-checkpoint allowlist')
