"""How the commands end, and their output files: checked before any work, written whole or not at all.

Every command (`train.py`, `generate.py`, `eval.py`, `export.py`, the converter) ends the same
way: exit 0 when done; 2 and one line for a usage, configuration or input error (the command must
change); 1 and one line for a failure while working (a full disk, an I/O error, a lost object
store: the same command can succeed later); 130 and where the work stands on Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable
from typing import IO

from cdcd_composer.storage import StorageFault

# What the system says when a write fails for want of room or of a working device.
WORKING_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)
USAGE_ERROR, WORK_FAILED, INTERRUPTED = 2, 1, 130


def run_command(work: Callable[[], int], interrupted: str) -> int:
    """`work()`'s exit status, or the status and one line of the way it failed (the module's convention).

    Args:
        work: The command's work after its command line was read; returns its status.
        interrupted: Where the work stands after Ctrl-C, e.g. 'while sampling: nothing was written'.
    """
    try:
        return work()
    except KeyboardInterrupt:
        print(f'interrupted {interrupted}', file=sys.stderr)
        return INTERRUPTED
    except (ValueError, OSError) as e:
        print(f'error: {error_line(e)}', file=sys.stderr)
        return WORK_FAILED if failed_while_working(e) else USAGE_ERROR


def failed_while_working(error: BaseException) -> bool:
    """A storage fault or an OSError of room or device, not a wrong input (a missing path, a bad flag)."""
    return isinstance(error, StorageFault) or (isinstance(error, OSError) and error.errno in WORKING_FAILURES)


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
        StorageFault: the write failed.
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
        raise StorageFault(
            f'{flag} {path}: writing failed ({e.strerror or e}); nothing was written'
        ) from None


def error_line(error: Exception) -> str:
    """What a CLI prints after `error: `: an OSError names its path and what the system said.

    `[Errno 28] No space left on device: '/data/x'` becomes `/data/x: No space left on device
    (check the path, its permissions and the free space)`; other errors are their own message.
    """
    if isinstance(error, OSError) and error.strerror:
        where = f'{error.filename}: ' if error.filename else ''
        return f'{where}{error.strerror} (check the path, its permissions and the free space)'
    return str(error)
