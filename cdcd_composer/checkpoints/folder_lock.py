"""One writer per save folder: a live run holds a lock file that a second run refuses in one line.

The lock is `.cdcd-run.lock` in the local save folder, created exclusively by global rank 0 with
the holder's host, pid and process start time. A second run finds it and refuses, naming the
holder, while that process lives; a lock whose process is gone (a SIGKILL, a crash, a reboot) is
stale and taken over. A holder on another host cannot be checked from here: the refusal then says
how to remove the lock once that run is known to be over. An object store has no exclusive create
that every store honours, so a run on one says once, at start, that nothing stops a second run.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket

log = logging.getLogger(__name__)

LOCK_NAME = '.cdcd-run.lock'
_HELD: list[FolderLock] = []  # the locks this process took, released by `release_save_folders`


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None if it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        try:  # not Linux: whether the pid exists at all
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 'unknown'


def _me() -> dict[str, object]:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'start': _start_time(os.getpid())}


class FolderLock:
    """The lock of one local save folder, held by this process until `release` (or its exit)."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False

    def acquire(self) -> None:
        """Creates the lock, taking over a stale one.

        Raises:
            ValueError: one line naming the live holder (or the unverifiable one) and the way out.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):  # another run may take a stale lock between our look and our create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(_me(), f)
            self.held = True
            atexit.register(self.release)
            return
        raise ValueError(f'save_folder {os.path.dirname(self.path)}: could not take its lock {self.path}')

    def _refuse_or_clear(self) -> None:
        """Returns after removing a stale lock (or finding this process's own); raises for a live one."""
        folder = os.path.dirname(self.path)
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = None  # written by a run killed mid-write, or removed since: stale either way
        me = _me()
        if isinstance(holder, dict) and holder.get('host') == me['host']:
            pid = holder.get('pid')
            if pid == me['pid'] and holder.get('start') == me['start']:
                self.held = True  # this process holds it already (a second build in one process)
                raise _Held
            started, recorded = (_start_time(pid) if isinstance(pid, int) else None), holder.get('start')
            if started is not None and (started == recorded or 'unknown' in (started, recorded)):  # alive
                raise ValueError(
                    f'save_folder {folder} is in use by a live run (pid {pid} on {me["host"]}); wait for '
                    f'it to end or stop it, or give this run another save_folder'
                )
        elif isinstance(holder, dict):
            raise ValueError(
                f'save_folder {folder} is locked by pid {holder.get("pid")} on host {holder.get("host")}, '
                f'which cannot be checked from here; if no run is live there, delete {self.path}'
            )
        log.warning('save_folder %s: taking over the stale lock of a run that is gone (%s)', folder, holder)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Removes the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as f:
                holder = json.load(f)
            if holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
                os.remove(self.path)
        except (OSError, ValueError):
            pass


class _Held(Exception):
    """This process already holds the lock."""


def hold_save_folder(folder: str | None, remote: bool) -> FolderLock | None:
    """Takes the lock of a local save folder (global rank 0's job); for a remote one, says there is none.

    Raises:
        ValueError: another live run holds the folder.
    """
    if folder is None:
        return None
    if remote:
        log.warning(
            'save_folder %s is an object store: nothing stops a second run from writing there too; run '
            'one job per save_folder', folder,
        )  # fmt: skip
        return None
    lock = FolderLock(folder)
    try:
        lock.acquire()
    except _Held:
        return None  # the earlier holder in this process releases it
    _HELD.append(lock)
    return lock


def release_save_folders() -> None:
    """Releases every save-folder lock this process holds (a run that ended; the exit does it too)."""
    while _HELD:
        _HELD.pop().release()
