"""A folder on local disk or in an object store: a dataset root, a checkpoint folder, an export.

Small files (JSON, directories) are read and written through it, and directories are replaced
atomically: locally a directory is written to a hidden temporary sibling and renamed into place;
in an object store its old completeness marker goes before its new objects are uploaded, so at
every moment a reader sees either a complete directory or none.

Nothing this package did not write is ever deleted: every directory it writes carries an owner
marker (`.cdcd-owned`), and replacing a directory without one is refused with one line naming
it, whatever else it holds. A local root is locked while a conversion writes it (`lock`), so a
second one fails fast instead of sweeping the first one's staging.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

MANIFEST_FILE = 'manifest.json'  # a directory's completeness marker: written (uploaded) last
TEMP_PREFIX = '.tmp-'
OWNER_MARKER = '.cdcd-owned'  # in every directory this package writes: it may replace them
LOCK_FILE = '.cdcd-lock'
LEASE_FILE = '.cdcd-lease.json'  # an object-store root's one-writer lease (see `Folder.lease`)
LEASE_RENEW_S = 30.0
LEASE_EXPIRES_S = 120.0


class StorageError(ValueError):
    """The dataset root cannot be read or written; the message names the URI and the fix."""


class StorageFault(StorageError):
    """A write that failed or cannot fit (a full disk, an I/O error, a lost store) while working.

    The commands exit 1 on it (`outputs.run_command`): the same command can succeed once there is room.
    """


def is_remote(uri: str) -> bool:
    """Whether `uri` names an object store (`s3://`, `gs://`, `oci://`, ...) rather than a path."""
    return '://' in uri


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def mark_owned(directory: str, writing: bool = False) -> None:
    """Writes the owner marker into a local directory this package writes.

    Args:
        directory: The directory.
        writing: A staging directory: its marker names the writing process, so that staging left
            by a writer that died can be told from a live one's (`Folder.remove_dead_staging`). A
            finished directory's marker names no process: its bytes are the same whoever wrote it.
    """
    marker = {'writer': 'cdcd-composer', **({'pid': os.getpid()} if writing else {})}
    with open(os.path.join(directory, OWNER_MARKER), 'w') as f:
        json.dump(marker, f)


def check_writable(path: str, what: str) -> None:
    """Fails now, not at the first write hours later, when a local folder cannot be created or written.

    Args:
        path: Local folder (created later if missing); object-store URIs are not checked here.
        what: The setting that names it, for the message (e.g. 'save_folder').

    Raises:
        StorageError: one line naming the folder.
    """
    if is_remote(path):
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageError(f'{what} {path}: {existing} is a file, not a folder; choose another {what}')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f'{what} {path}: {existing} is not writable; choose a folder you can write to')


# Storage faults: what a full disk, a failing device or a lost object store raises, through any
# wrapper (torch.save's RuntimeError, safetensors' SafetensorError, Composer's upload errors).
FAULT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}
FAULT_TEXT = re.compile(
    'No space left on device|Disk quota exceeded|Input/output error|Read-only file system'
)
LOST_STORE = {'EndpointConnectionError', 'ConnectionClosedError', 'ConnectTimeoutError', 'ReadTimeoutError'}


def storage_fault(error: BaseException) -> str | None:
    """What the storage said, when `error` or anything in its cause chain is a storage fault, else None.

    Returns, e.g., '/ckpt/ep0-ba4-rank0.pt: No space left on device' or 'the object store is
    unreachable (Could not connect to the endpoint URL: ...)'.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FAULT_ERRNOS:
            return f'{e.filename}: {e.strerror}' if e.filename else str(e.strerror)
        if type(e).__name__ in LOST_STORE:
            return f'the object store is unreachable ({str(e).splitlines()[0][:160]})'
        found = FAULT_TEXT.search(str(e))
        if found:
            return found.group(0)
        e = e.__cause__ or e.__context__
    return None


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1000, as `df -H` prints)."""
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(n) < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    raise AssertionError('unreachable')


def check_free_space(path: str, need: int, what: str) -> None:
    """Refuses a write of about `need` bytes under a local `path` whose disk has less free.

    Object stores do not say how much room they have; they are not checked.

    Args:
        path: Where the bytes go (it need not exist yet).
        need: About how many bytes.
        what: The message's start, naming the write and its destination.

    Raises:
        StorageFault: one line naming the path, the space free and the space needed.
    """
    if is_remote(path):
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise StorageFault(
            f'{what}: its disk has {human_bytes(free)} free and this needs about {human_bytes(need)}; '
            'free some space or choose another folder'
        )


@contextmanager
def reporting_storage_faults(what: str, where: str, after: str) -> Iterator[None]:
    """Turns a storage fault raised in the block into one line; other errors pass unchanged.

    Args:
        what: What was being written ('the export', 'the train split').
        where: Its path or URI.
        after: What is left and how to go on, e.g. 'nothing was written: free space and rerun'.

    Raises:
        StorageFault: '{what} {where} failed ({fault}): {after}'.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        fault = storage_fault(e)
        if fault is None:
            raise
        raise StorageFault(f'writing {what} {where} failed ({fault}): {after}') from e


class Folder:
    """Small-file access (JSON, directories) to a folder, local or remote.

    Args:
        uri: Local directory or object-store URI (`s3://bucket/prefix`); credentials and
            `S3_ENDPOINT_URL` come from the environment.

    Raises:
        StorageError: the object store or bucket cannot be reached.
    """

    def __init__(self, uri: str):
        self.uri = uri.rstrip('/')
        self.store, self.prefix = None, ''
        if is_remote(uri):
            from composer.utils import maybe_create_object_store_from_uri, parse_uri

            try:
                self.store = maybe_create_object_store_from_uri(self.uri)
                self.prefix = parse_uri(self.uri)[2].strip('/')
                self.store.list_objects(self._key(''))  # Reachability and bucket check.
            except Exception as e:  # noqa: BLE001 - botocore/libcloud raise many types.
                raise StorageError(
                    f'cannot reach {self.uri}: {type(e).__name__}: {str(e).splitlines()[0][:200]} '
                    '(check the bucket name, credentials and S3_ENDPOINT_URL)'
                ) from e

    def _key(self, rel: str) -> str:
        return f'{self.prefix}/{rel}' if self.prefix else rel

    def join(self, rel: str) -> str:
        """The full path or URI of `rel` under the root."""
        return f'{self.uri}/{rel}'

    def read_json(self, rel: str) -> dict | None:
        """The JSON object at `rel`, or None when it does not exist."""
        if self.store is None:
            path = self.join(rel)
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                return json.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, 'file.json')
            try:
                self.store.download_object(self._key(rel), local)
            except FileNotFoundError:
                return None
            with open(local) as f:
                return json.load(f)

    def list_names(self, rel: str = '') -> list[str]:
        """Names of the entries directly under `rel` ([] when it does not exist)."""
        if self.store is None:
            path = self.join(rel) if rel else self.uri
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        prefix = self._key(rel).strip('/')
        prefix = f'{prefix}/' if prefix else ''
        return sorted({key[len(prefix) :].split('/')[0] for key in self.store.list_objects(prefix)})

    def exists(self, rel: str) -> bool:
        """Whether a file (or, locally, a directory) exists at `rel`."""
        if self.store is None:
            return os.path.exists(self.join(rel))
        try:
            self.store.get_object_size(self._key(rel))
            return True
        except FileNotFoundError:
            return False

    def write_json(self, rel: str, obj: dict) -> None:
        """Writes `obj` to `rel` atomically (locally: temporary file and rename)."""
        with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False, dir=self._local_dir(rel)) as f:
            json.dump(obj, f, indent=2)
        os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it private; a dataset is meant to be shared.
        if self.store is None:
            os.replace(f.name, self.join(rel))
        else:
            try:
                self.store.upload_object(self._key(rel), f.name)
            finally:
                os.remove(f.name)

    def _local_dir(self, rel: str) -> str | None:
        if self.store is not None:
            return None
        path = os.path.dirname(self.join(rel))
        os.makedirs(path, exist_ok=True)
        return path

    def remove(self, rel: str) -> None:
        """Deletes the file or directory (object prefix) `rel`; missing is fine."""
        if self.store is None:
            path = self.join(rel)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            return
        client = getattr(self.store, 'client', None)
        if client is None or not hasattr(client, 'delete_object'):
            raise StorageError(f'cannot delete from {self.uri}: remove {self.join(rel)} by hand, then rerun')
        for key in self.store.list_objects(self._key(rel)):
            if key == self._key(rel) or key.startswith(self._key(rel) + '/'):
                client.delete_object(Bucket=self.store.bucket, Key=key)

    def new_staging(self, rel: str) -> str:
        """A new local directory whose files `commit_directory` will turn into `rel` (see `mark_owned`)."""
        if self.store is None:
            os.makedirs(self.uri, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f'{TEMP_PREFIX}{os.path.basename(rel)}-', dir=self.uri)
        else:
            staging = tempfile.mkdtemp(prefix='cdcd-upload-')
        return staging

    def owns(self, rel: str) -> bool:
        """Whether `rel` may be replaced: absent, an empty directory, or a directory we wrote."""
        if self.store is None:
            path = self.join(rel)
            if not os.path.lexists(path):
                return True
            if not os.path.isdir(path) or os.path.islink(path):
                return False
            names = os.listdir(path)
            return not names or OWNER_MARKER in names
        prefix = self._key(rel).strip('/') + '/'
        names = {key[len(prefix) :] for key in self.store.list_objects(prefix) if key.startswith(prefix)}
        return not names or OWNER_MARKER in names

    def claim(self, what: str) -> None:
        """Makes the root ours before anything is written into it.

        An absent or empty root gets our marker; a marked one is ours already. A root holding
        anything else (our lock and our staging aside) holds the user's files, whatever their
        names, and is refused: files named like ours (`cdcd_dataset.json`) do not make it ours.

        Args:
            what: The setting that names the root, for the message (e.g. '--out_root').

        Raises:
            StorageError: one line naming the folder and the fix.
        """
        if self.store is None and os.path.exists(self.uri) and not os.path.isdir(self.uri):
            raise StorageError(f'{self.uri} is a file, not a directory: choose another folder')
        ours = (LOCK_FILE, LEASE_FILE)
        names = [n for n in self.list_names() if n not in ours and not n.startswith(TEMP_PREFIX)]
        if OWNER_MARKER in names:
            return
        if names:
            raise StorageError(
                f'{what} {self.uri} holds files cdcd-composer did not write (no {OWNER_MARKER} marker, '
                f'found {", ".join(names[:3])}): choose a new or empty folder, or move them away (a dataset '
                f'an earlier cdcd-composer wrote lacks the marker: add an empty {OWNER_MARKER} file to it)'
            )
        if self.store is None:
            os.makedirs(self.uri, exist_ok=True)
            mark_owned(self.uri)
        else:
            self.upload_marker('')

    def upload_marker(self, rel: str) -> None:
        """Uploads our owner marker into the folder `rel` of a remote root ('' for the root itself)."""
        with tempfile.TemporaryDirectory() as tmp:
            mark_owned(tmp)
            self.upload(os.path.join(tmp, OWNER_MARKER), f'{rel}/{OWNER_MARKER}' if rel else OWNER_MARKER)

    def check_replaceable(self, rel: str) -> None:
        """Raises when replacing `rel` would delete something this package did not write.

        Raises:
            StorageError: one line naming the path and the fix.
        """
        if not self.owns(rel):
            raise StorageError(
                f'{self.join(rel)} holds files cdcd-composer did not write (no {OWNER_MARKER} marker) and '
                'would be deleted: move them away or choose another folder'
            )

    def commit_directory(self, staging: str, rel: str) -> None:
        """Replaces `rel` by the files of `staging`, if `rel` is absent or ours (`check_replaceable`).

        Locally `staging` is renamed over `rel`; remotely `rel`'s old objects are deleted and the
        files uploaded, `manifest.json` last.
        """
        self.check_replaceable(rel)
        if os.path.isfile(os.path.join(staging, OWNER_MARKER)):
            mark_owned(staging)  # finished: the marker no longer names the writer
        if self.store is None:
            os.chmod(staging, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared.
            self.remove(rel)
            os.rename(staging, self.join(rel))
            return
        self.remove(rel)
        files = [
            os.path.relpath(os.path.join(folder, name), staging)
            for folder, _, names in os.walk(staging)
            for name in names
        ]
        for name in sorted(files, key=lambda n: n == MANIFEST_FILE):  # The marker goes last.
            self.upload(os.path.join(staging, name), f'{rel}/{name}')

    def fetch_directory(self, rel: str, local_dir: str) -> str:
        """Downloads every file under `rel` into `local_dir` (remote roots); returns `local_dir`."""
        prefix = self._key(rel).strip('/')
        prefix = f'{prefix}/' if prefix else ''
        for key in self.store.list_objects(prefix):
            name = key[len(prefix) :]
            self.store.download_object(key, os.path.join(local_dir, name), overwrite=True)
        return local_dir

    def fetch_file(self, rel: str, local_path: str) -> str:
        """Downloads one file (remote roots); returns `local_path`."""
        self.store.download_object(self._key(rel), local_path, overwrite=True)
        return local_path

    def upload(self, local_path: str, rel: str) -> None:
        """Uploads one local file to `rel` (remote roots only)."""
        self.store.upload_object(self._key(rel), local_path)

    @contextmanager
    def staged_directory(self, rel: str, size: int = 0, what: str = 'the folder') -> Iterator[str]:
        """A local directory whose files become `rel` when the block ends without error.

        Staging of `rel` left by a writer that died (a SIGKILLed export) goes first: ours by its
        marker, stale because the process that wrote the marker is gone. Then the staging disk
        must have `size` bytes free; a full disk or a lost store while writing is one line, the
        staging is removed and `rel` stays as it was.

        Args:
            rel: The directory to (re)place, relative to this folder.
            size: About how many bytes will be written.
            what: What it is, for messages ('the export').

        Raises:
            StorageError: too little free space, or a storage fault while writing.
        """
        self.remove_dead_staging(rel)
        disk = self.join(rel) if self.store is None else tempfile.gettempdir()
        check_free_space(disk, size, f'writing {what} to {self.join(rel)}')
        staging = self.new_staging(rel)
        after = f'{self.join(rel)} is as it was: free space and rerun'
        try:
            with reporting_storage_faults(what, self.join(rel), after):
                mark_owned(staging, writing=True)
                yield staging
                self.commit_directory(staging, rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove_dead_staging(self, rel: str) -> None:
        """Deletes our staging of `rel` whose writer (the pid in its marker) no longer runs on this host."""
        if self.store is not None or not os.path.isdir(self.uri):
            return
        prefix = f'{TEMP_PREFIX}{os.path.basename(rel)}-'
        for name in os.listdir(self.uri):
            marker = os.path.join(self.uri, name, OWNER_MARKER)
            if not name.startswith(prefix) or not os.path.isfile(marker):
                continue
            try:
                with open(marker) as f:
                    pid = json.load(f).get('pid')
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(pid, int) and not _alive(pid):
                log.warning('removing %s, staging left by a writer that is gone (pid %d)', name, pid)
                shutil.rmtree(os.path.join(self.uri, name), ignore_errors=True)

    def remove_stale_staging(self) -> None:
        """Deletes our temporary directories left by interrupted local writes.

        Only directories that carry our marker go, and only a holder of `lock` should call
        this: another writer's live staging is never swept.
        """
        if self.store is None and os.path.isdir(self.uri):
            for name in os.listdir(self.uri):
                path = os.path.join(self.uri, name)
                if name.startswith(TEMP_PREFIX) and os.path.isfile(os.path.join(path, OWNER_MARKER)):
                    shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Holds an exclusive lock on a local root (`.cdcd-lock`, naming the holder's pid).

        The operating system releases it when the holder exits, even on SIGKILL. An object-store
        root is held with a lease instead (`lease`).

        Raises:
            StorageError: another process holds the lock.
        """
        if self.store is not None:
            with self.lease():
                yield
            return
        if os.path.exists(self.uri) and not os.path.isdir(self.uri):
            raise StorageError(f'{self.uri} is a file, not a directory: choose another folder')
        os.makedirs(self.uri, exist_ok=True)
        path = os.path.join(self.uri, LOCK_FILE)
        with open(path, 'a+') as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or 'unknown'
                raise StorageError(
                    f'{self.uri} is being written by another process (pid {holder}, lock {path}): wait for '
                    'it to finish or choose another folder'
                ) from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()  # released: no holder to name
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Holds an object-store root for one writer: `.cdcd-lease.json`, naming it, renewed every 30 s.

        A lease renewed within the last 120 s is another writer's, unless its process is known dead
        (same host, pid gone, as after a SIGKILL); an older one was left by a writer that died and
        is taken over. Of two writers starting together, the one whose lease a read-back shows wins.

        Raises:
            StorageError: another writer holds the root (one line naming it and the lease).
        """
        me = {'id': uuid.uuid4().hex, 'host': socket.gethostname(), 'pid': os.getpid()}
        held = self.read_json(LEASE_FILE)
        if held is not None and self._lease_is_live(held):
            raise self._held_by(held)
        self.write_json(LEASE_FILE, {**me, 'renewed': time.time()})
        held = self.read_json(LEASE_FILE) or {}
        if held.get('id') != me['id']:
            raise self._held_by(held)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_RENEW_S):
                try:
                    self.write_json(LEASE_FILE, {**me, 'renewed': time.time()})
                except Exception as e:  # noqa: BLE001 - the store's own errors; the run goes on
                    log.warning('renewing the lease %s failed: %s', self.join(LEASE_FILE), e)

        thread = threading.Thread(target=renew, name='cdcd-lease', daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            try:
                if (self.read_json(LEASE_FILE) or {}).get('id') == me['id']:
                    self.remove(LEASE_FILE)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning('could not remove the lease %s (it expires in %.0f s): %s', self.join(LEASE_FILE),
                            LEASE_EXPIRES_S, e)  # fmt: skip

    @staticmethod
    def _lease_is_live(held: dict) -> bool:
        """Whether a lease read from the store still holds the root."""
        age = time.time() - float(held.get('renewed', 0))
        if age >= LEASE_EXPIRES_S:
            return False
        pid = held.get('pid')
        return not (held.get('host') == socket.gethostname() and isinstance(pid, int) and not _alive(pid))

    def _held_by(self, held: dict) -> StorageError:
        age = time.time() - float(held.get('renewed', 0))
        return StorageError(
            f'{self.uri} is being written by another process (pid {held.get("pid")} on {held.get("host")}, '
            f'lease {self.join(LEASE_FILE)} renewed {age:.0f} s ago): wait for it to finish or choose '
            f'another folder (a lease not renewed for {LEASE_EXPIRES_S:.0f} s is taken over)'
        )
