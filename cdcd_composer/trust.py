"""Whether a pickle may be unpickled: a Composer `.pt` checkpoint can run arbitrary code when loaded.

A checkpoint is trusted by default only when it is a local file owned by you and writable by no
one else, in directories only you (or root) can change; otherwise the caller must say it trusts
it (`--trust_checkpoint`, `trust_checkpoint=true`).
"""

from __future__ import annotations

import os
import pickle
import stat
from typing import Any

import torch

from cdcd_composer.data.store import is_remote


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
        'you trust it, or use a weights-only export (python export.py CHECKPOINT OUT_DIR)'
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
