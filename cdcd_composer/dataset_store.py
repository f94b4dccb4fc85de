"""A dataset root on local disk or in an object store, and atomic writes of MDS splits into it.

Completeness is marked, never assumed: a split is complete when its `manifest.json` exists (it
is written after the shards and `index.json`), the dataset when `cdcd_dataset.json` exists
(written after everything else). Locally a split is written to a hidden temporary sibling and
renamed into place; in an object store the split's old markers are deleted before its shards
are uploaded, so at every moment a reader sees either a complete split or none.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from streaming import MDSWriter

log = logging.getLogger(__name__)

MANIFEST_FILE = 'manifest.json'
TEMP_PREFIX = '.tmp-'


class StoreError(ValueError):
    """The dataset root cannot be read or written; the message names the URI and the fix."""


def is_remote(uri: str) -> bool:
    """Whether `uri` names an object store (`s3://`, `gs://`, `oci://`, ...) rather than a path."""
    return '://' in uri


class DatasetRoot:
    """Small-file access (JSON, directories) to a dataset root, local or remote.

    Args:
        uri: Local directory or object-store URI (`s3://bucket/prefix`); credentials and
            `S3_ENDPOINT_URL` come from the environment.

    Raises:
        StoreError: the object store or bucket cannot be reached.
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
                raise StoreError(
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
            raise StoreError(f'cannot delete from {self.uri}: remove {self.join(rel)} by hand, then rerun')
        for key in self.store.list_objects(self._key(rel)):
            if key == self._key(rel) or key.startswith(self._key(rel) + '/'):
                client.delete_object(Bucket=self.store.bucket, Key=key)

    def new_staging(self, rel: str) -> str:
        """A new local directory whose files `commit_directory` will turn into `rel`."""
        if self.store is None:
            os.makedirs(self.uri, exist_ok=True)
            return tempfile.mkdtemp(prefix=f'{TEMP_PREFIX}{os.path.basename(rel)}-', dir=self.uri)
        return tempfile.mkdtemp(prefix='cdcd-upload-')

    def commit_directory(self, staging: str, rel: str) -> None:
        """Replaces `rel` by the files of `staging`.

        Locally `staging` is renamed over `rel`; remotely `rel`'s old objects are deleted and the
        files uploaded, `manifest.json` last.
        """
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
    def staged_directory(self, rel: str) -> Iterator[str]:
        """A local directory whose files become `rel` when the block ends without error."""
        staging = self.new_staging(rel)
        try:
            yield staging
            self.commit_directory(staging, rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove_stale_staging(self) -> None:
        """Deletes temporary directories left by interrupted local writes."""
        if self.store is None and os.path.isdir(self.uri):
            for name in os.listdir(self.uri):
                if name.startswith(TEMP_PREFIX):
                    shutil.rmtree(os.path.join(self.uri, name), ignore_errors=True)


class SplitWriter:
    """Writes examples of one split as MDS shards (zstd, xxh64) and commits them atomically.

    Use as a context manager: shards go to a staging location while the block runs;
    `commit(manifest)` finishes them, writes `manifest.json` and moves the split into place.
    Leaving the block without a commit (an exception, Ctrl-C) commits nothing.

    Args:
        root: Where the split goes.
        split: Split name ('train', 'val').
        seq_len: Tokens per example.
        dtype: 'uint16' or 'int32'.
        size_limit: Shard size limit before compression (Streaming's syntax, e.g. '64mb').
    """

    def __init__(self, root: DatasetRoot, split: str, seq_len: int, dtype: str, size_limit: str = '64mb'):
        self.root, self.split, self.seq_len, self.dtype = root, split, seq_len, dtype
        self.size_limit = size_limit
        self.carry = np.zeros(0, dtype)
        self.examples = 0

    def __enter__(self) -> SplitWriter:
        root = self.root
        root.remove_stale_staging()
        columns = {'tokens': f'ndarray:{self.dtype}:{self.seq_len}'}
        kwargs = dict(columns=columns, compression='zstd', hashes=['xxh64'], size_limit=self.size_limit)
        self.staging = root.new_staging(self.split)
        if root.store is None:
            self.writer = MDSWriter(out=self.staging, **kwargs)
        else:
            # Old objects go first: from here on the split is visibly incomplete until commit.
            root.remove(self.split)
            self.writer = MDSWriter(out=(self.staging, root.join(self.split)), **kwargs)
        return self

    def write_examples(self, examples: np.ndarray) -> None:
        """Writes complete examples, shape (n, seq_len)."""
        for row in examples:
            self.writer.write({'tokens': row})
        self.examples += len(examples)

    def write_stream(self, stream: np.ndarray) -> None:
        """Packs a token stream into full windows; the remainder waits for the next stream."""
        stream = np.concatenate([self.carry, stream])
        full = len(stream) // self.seq_len * self.seq_len
        self.write_examples(stream[:full].reshape(-1, self.seq_len))
        self.carry = stream[full:]

    def commit(self, manifest: dict) -> None:
        """Finishes the shards and writes `manifest.json`; the split becomes visible."""
        self.writer.finish()
        if self.root.store is None:
            with open(os.path.join(self.staging, MANIFEST_FILE), 'w') as f:
                json.dump(manifest, f, indent=2)
            self.root.commit_directory(self.staging, self.split)
        else:  # The writer has uploaded (and removed) the shards and index.json; the marker is last.
            self.root.write_json(f'{self.split}/{MANIFEST_FILE}', manifest)

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
