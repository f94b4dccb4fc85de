"""Atomic writes of one MDS split into a dataset folder.

Completeness is marked, never assumed: a split is complete when its `manifest.json` exists (it
is written after the shards and `index.json`), the dataset when `cdcd_dataset.json` exists
(written after everything else).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from streaming import MDSWriter
from streaming.base.util import bytes_to_int

from cdcd_composer.storage import MANIFEST_FILE, Folder, check_free_space, mark_owned


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

    def __init__(self, root: Folder, split: str, seq_len: int, dtype: str, size_limit: str = '64mb'):
        self.root, self.split, self.seq_len, self.dtype = root, split, seq_len, dtype
        self.size_limit = size_limit
        self.carry = np.zeros(0, dtype)
        self.examples = 0
        self.shard_bytes = bytes_to_int(size_limit)
        self.unchecked = 0  # bytes written since the last free-space check

    def __enter__(self) -> SplitWriter:
        root = self.root
        root.check_replaceable(self.split)
        columns = {'tokens': f'ndarray:{self.dtype}:{self.seq_len}'}
        kwargs = dict(columns=columns, compression='zstd', hashes=['xxh64'], size_limit=self.size_limit)
        self.staging = root.new_staging(self.split)
        self.check_room()
        if root.store is None:
            self.writer = MDSWriter(out=self.staging, **kwargs)  # it wants an empty directory
            mark_owned(self.staging, writing=True)
        else:
            # Old objects go first: from here on the split is visibly incomplete until commit.
            root.remove(self.split)
            self.writer = MDSWriter(out=(self.staging, root.join(self.split)), **kwargs)
            root.upload_marker(self.split)
        return self

    def write_examples(self, examples: np.ndarray) -> None:
        """Writes complete examples, shape (n, seq_len)."""
        for row in examples:
            self.writer.write({'tokens': row})
        self.examples += len(examples)
        self.unchecked += examples.nbytes
        if self.unchecked >= self.shard_bytes:
            self.check_room()

    def check_room(self) -> None:
        """Room for the next shard, twice its size limit (the shard and its compressed copy)."""
        self.unchecked = 0
        where = f'writing the {self.split} split to {self.root.join(self.split)}'
        check_free_space(self.staging, 2 * self.shard_bytes, where)

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
