"""A CLI's output file: checked before any work, written with a one-line error if the write fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO


def check_output_file(path: str, flag: str = '--out') -> None:
    """`path` can be written, checked before any sampling or evaluation (not after it).

    Raises:
        ValueError: one line naming the path and the fix.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(
            f'{flag} {path} is a directory; give a file name such as {path.rstrip("/")}/samples.jsonl'
        )
    if not os.path.isdir(folder):
        raise ValueError(f'{flag} {path}: folder {folder} does not exist; create it first')
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f'{flag} {path} is not writable; choose another path')


def write_output_file(path: str, write: Callable[[IO[str]], None], flag: str = '--out') -> None:
    """Writes `path` with `write(file)`; a failing write (a full disk, EIO) is one line naming it.

    Raises:
        ValueError: the write failed; `path` may hold a partial file, which the message says.
    """
    try:
        with open(path, 'w') as f:
            write(f)
    except OSError as e:
        raise ValueError(f'{flag} {path}: writing failed ({e.strerror or e}); it may be partial') from None


def error_line(error: Exception) -> str:
    """What a CLI prints after `error: `: an OSError names its path and what the system said.

    `[Errno 28] No space left on device: '/data/x'` becomes `/data/x: No space left on device
    (check the path, its permissions and the free space)`; other errors are their own message.
    """
    if isinstance(error, OSError) and error.strerror:
        where = f'{error.filename}: ' if error.filename else ''
        return f'{where}{error.strerror} (check the path, its permissions and the free space)'
    return str(error)
