"""A CLI's output file: checked before any work, written with a one-line error if the write fails."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import IO


def _where(path: str) -> str:
    """A comparable form of a path: the real local path, or a URI without its trailing slash."""
    return path.rstrip('/') if '://' in path else os.path.realpath(path)


def check_not_an_input(out: str, inputs: Iterable[str | None], flag: str) -> None:
    """Refuses an output that is one of the command's inputs, lies inside one, or holds one.

    Raises:
        ValueError: one line naming both paths.
    """
    target = _where(out)
    for given in (path for path in inputs if path):
        source = _where(given)
        if target == source or target.startswith(source + '/') or source.startswith(target + '/'):
            raise ValueError(
                f'{flag} {out} would write over {given}, an input of this command; choose another path'
            )


def check_output_file(path: str, flag: str = '--out', inputs: Iterable[str | None] = ()) -> None:
    """`path` can be written, checked before any sampling or evaluation (not after it).

    Only a new path or a regular text file is written, never one of the command's `inputs` (nor a
    file inside one), never a file inside a folder this package manages (a dataset, an export, a
    run's save folder: they carry `.cdcd-owned` or `.cdcd-lock`), never a binary file (a checkpoint,
    weights, a shard: NUL bytes in its first 8 KB), and never a FIFO, device or socket.

    Raises:
        ValueError: one line naming the path and the fix.
    """
    check_not_an_input(path, inputs, flag)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise ValueError(f'{flag} {path} is not a regular file (a FIFO, device or socket); give a file name')
    if os.path.isdir(path):
        raise ValueError(
            f'{flag} {path} is a directory; give a file name such as {path.rstrip("/")}/samples.jsonl'
        )
    if not os.path.isdir(folder):
        raise ValueError(f'{flag} {path}: folder {folder} does not exist; create it first')
    managed = [name for name in ('.cdcd-owned', '.cdcd-lock') if os.path.exists(os.path.join(folder, name))]
    if managed:
        raise ValueError(
            f'{flag} {path} lies in {folder}, a folder cdcd-composer manages (it holds {managed[0]}: a '
            'dataset, an export or a run); choose a path outside it'
        )
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            if b'\0' in f.read(8192):
                raise ValueError(
                    f'{flag} {path} exists and is not a text file (a checkpoint, weights or data?); '
                    'choose another path'
                )
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f'{flag} {path} is not writable; choose another path')


def write_output_file(path: str, write: Callable[[IO[str]], None], flag: str = '--out') -> None:
    """Writes `path` with `write(file)`, staged beside it and renamed into place when complete.

    A failing write (a full disk, EIO) is one line naming it, and leaves `path` as it was.

    Raises:
        ValueError: the write failed.
    """
    staged = os.path.join(
        os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp-{os.getpid()}'
    )
    try:
        with open(staged, 'w') as f:
            write(f)
        os.replace(staged, path)
    except OSError as e:
        if os.path.exists(staged):
            os.remove(staged)
        raise ValueError(f'{flag} {path}: writing failed ({e.strerror or e}); nothing was written') from None


def error_line(error: Exception) -> str:
    """What a CLI prints after `error: `: an OSError names its path and what the system said.

    `[Errno 28] No space left on device: '/data/x'` becomes `/data/x: No space left on device
    (check the path, its permissions and the free space)`; other errors are their own message.
    """
    if isinstance(error, OSError) and error.strerror:
        where = f'{error.filename}: ' if error.filename else ''
        return f'{where}{error.strerror} (check the path, its permissions and the free space)'
    return str(error)
