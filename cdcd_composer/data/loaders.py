"""Reading a converted dataset: checks of its splits and files, and Streaming dataloaders."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from multiprocessing.shared_memory import SharedMemory as BuiltinSharedMemory
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.compression import decompress
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.hashing import get_hash
from streaming.base.shared import SharedMemory
from streaming.base.shared import prefix as streaming_prefix
from streaming.base.shared.prefix import _unpack_locals
from torch.utils.data import DataLoader, default_collate

from cdcd_composer import workarounds
from cdcd_composer.data.metadata import METADATA_FILE, TOKENIZER_DIR
from cdcd_composer.storage import Folder, is_remote

log = logging.getLogger(__name__)

FILELOCKS = (BARRIER_FILELOCK, CACHE_FILELOCK)


class StoryDataset(StreamingDataset):
    """A split of MDS token shards; yields `{'tokens': LongTensor (seq_len,), 'index': LongTensor ()}`.

    The index is the sample's position in the dataset: its training draws are a function of it
    (`sample_draws`), whichever rank and microbatch it lands in.
    """

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        # Streaming hands out read-only views of the shard: copy before making a tensor.
        tokens = torch.from_numpy(sample['tokens'].astype(np.int64))
        return {'tokens': tokens, 'index': torch.tensor(int(index), dtype=torch.int64)}


def check_split(root: str, split: str) -> set[str]:
    """Fails fast, before any model is built, when a split is missing, incomplete or corrupt.

    Locally every shard must exist with the size and xxh64 hash its `index.json` records (a
    fast pass: xxh64 reads GB/s). For an object-store root the index is fetched and every shard
    must be listed; hashes are then checked by Streaming as each shard is downloaded.

    Args:
        root: Dataset root (local path or object-store URI).
        split: Split directory name.

    Returns:
        The MDS encodings of its `tokens` column (e.g. {'ndarray:uint16:128'}), for
        `check_canvas` once the dataset's description is read.

    Raises:
        ValueError: one line naming the split or shard and the fix.
    """
    fix = f'rebuild it with `python data_prep/convert_tinystories.py --out_root {root} --overwrite`'
    if is_remote(root):
        store, where = Folder(root), f'{root.rstrip("/")}/{split}'
        index = store.read_json(f'{split}/index.json')
        if index is None:
            raise ValueError(f'{where}/index.json not found: no {split!r} split under data.root; {fix}')
        listed = set(store.list_names(split))
    else:
        where = os.path.join(root, split)
        path = os.path.join(where, 'index.json')
        if not os.path.isfile(path):
            raise ValueError(
                f'{path} not found: data.root {root!r} has no {split!r} split; create it with '
                f'`python data_prep/convert_tinystories.py --out_root {root}` or fix data.root'
            )
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:  # unreadable, or not JSON (UnicodeDecodeError is a ValueError)
            raise ValueError(f'{path} cannot be read ({getattr(e, "strerror", None) or e}); {fix}') from None
    encodings = set()
    for shard in index_shards(index, f'{where}/index.json', fix):
        names, kinds = shard.get('column_names') or [], shard.get('column_encodings') or []
        encodings |= {kind for name, kind in zip(names, kinds) if name == 'tokens'}
        files = [info for info in (shard.get('zip_data'), shard['raw_data']) if info]
        if is_remote(root):
            if not any(info['basename'] in listed for info in files):
                raise ValueError(f'{where}/{files[0]["basename"]} is missing; {fix}')
            continue
        _check_local_shard(where, files, fix)
    return encodings


def check_canvas(root: str, split: str, encodings: set[str], seq_len: int, token_dtype: str) -> None:
    """The split's shards hold the examples `cdcd_dataset.json` describes (length and dtype).

    Raises:
        ValueError: one line naming the split, both shapes and the fix.
    """
    expected = f'ndarray:{token_dtype}:{seq_len}'
    if encodings and encodings != {expected}:
        raise ValueError(
            f'{root.rstrip("/")}/{split} holds examples encoded as {", ".join(sorted(encodings))}, but '
            f'cdcd_dataset.json says {seq_len} {token_dtype} tokens ({expected}); rebuild it with '
            f'`python data_prep/convert_tinystories.py --out_root {root} --overwrite`'
        )


def index_shards(index: Any, where: str, fix: str) -> list[dict]:
    """The shards of an MDS `index.json`, once it has the shape Streaming reads.

    Each shard needs `raw_data` (and optionally `zip_data`) with a `basename` and a size in `bytes`.

    Raises:
        ValueError: one line naming the file, what is wrong and the fix.
    """
    shards = index.get('shards') if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f'{where} is not an MDS index (no list of shards); {fix}')
    for i, shard in enumerate(shards):
        forms = [shard.get('raw_data'), shard.get('zip_data')] if isinstance(shard, dict) else [None]
        if not all(
            isinstance(info, dict)
            and isinstance(info.get('basename'), str)
            and isinstance(info.get('bytes'), int)
            for info in forms[:1] + [f for f in forms[1:] if f is not None]
        ):
            raise ValueError(f'{where}: shard {i} lacks raw_data/zip_data with a basename and bytes; {fix}')
    return shards


def _check_local_shard(where: str, files: list[dict], fix: str) -> None:
    """A shard exists, and each of its forms present has the recorded size and xxh64 hash.

    Both forms count: Streaming reads the decompressed `.mds` beside the `.zstd` once it has
    made it, and never checks it again.
    """
    present = [info for info in files if os.path.isfile(os.path.join(where, info['basename']))]
    if not present:
        raise ValueError(f'shard {os.path.join(where, files[0]["basename"])} is missing; {fix}')
    for info in present:
        path = os.path.join(where, info['basename'])
        with open(path, 'rb') as f:
            data = f.read()
        expected = info.get('hashes', {}).get('xxh64')
        if len(data) != info['bytes'] or (expected and get_hash('xxh64', data) != expected):
            raise ValueError(f'shard {path} is corrupt (size or xxh64 hash differs from index.json); {fix}')


def decompress_local_split(where: str) -> None:
    """Writes the `.mds` of every compressed shard of a local split that lacks one, atomically.

    Streaming decompresses a local dataset in place on first read, through one fixed
    `shard.NNNNN.mds.tmp` name guarded by a lock only one node sees: nodes sharing the dataset's
    filesystem (NFS, Lustre, or two simulated nodes on one host) race on that name and one dies
    (FileNotFoundError in the rename). Here every writer has its own temporary name and an atomic
    rename, so any number of nodes may do it at once; Streaming then finds the shards ready.

    Args:
        where: The split's directory (`<root>/<split>`, holding `index.json`).
    """
    with open(os.path.join(where, 'index.json')) as f:
        shards = json.load(f)['shards']
    for shard in shards:
        raw, packed = shard['raw_data']['basename'], (shard.get('zip_data') or {}).get('basename')
        if packed is None or os.path.isfile(os.path.join(where, raw)):
            continue
        with open(os.path.join(where, packed), 'rb') as f:
            data = decompress(shard['compression'], f.read())
        with tempfile.NamedTemporaryFile(dir=where, prefix=f'{raw}.', suffix='.tmp', delete=False) as out:
            out.write(data)
        shutil.copymode(os.path.join(where, packed), out.name)  # not tempfile's owner-only 0600
        os.replace(out.name, os.path.join(where, raw))


def composer_dist() -> Any:
    """Composer's `dist` where several ranks run; None in one process, which then needs no Composer.

    eval.py reads the validation split in one process and does not import Composer.
    """
    if int(os.environ.get('WORLD_SIZE', '1')) == 1:
        return None
    from composer.utils import dist

    return dist


def decompress_on_local_leader(local: str) -> None:
    """Local rank 0 decompresses a local split in place; the node's other ranks wait for it."""
    ranks = composer_dist()
    if ranks is None or ranks.get_local_rank() == 0:
        decompress_local_split(local)
    if ranks is not None:
        ranks.barrier()


def build_dataloader(
    root: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    local_cache: str | None = None,
    drop_last: bool = True,
    num_canonical_nodes: int | None = None,
    shuffle_algo: str = 'py1e',
) -> DataLoader:
    """A DataLoader over one split of a local or remote (`s3://...`) dataset.

    Args:
        root: Dataset root holding `<split>/index.json` (local path or object-store URI).
        split: 'train' or 'val'.
        batch_size: Per-device batch size.
        shuffle: Shuffle samples (deterministic given `seed`, resumable mid-epoch).
        seed: Shuffle seed.
        num_workers: DataLoader worker processes.
        local_cache: Where remote shards are cached; required for a remote root.
        drop_last: Drop the last incomplete batch.
        num_canonical_nodes: Streaming's canonical nodes: with the seed and `shuffle_algo`, they
            fix the global sample order whatever the number of ranks (None: Streaming's default).
        shuffle_algo: Streaming's shuffle algorithm.
    """
    if is_remote(root):
        if local_cache is None:
            raise ValueError(f'data.local_cache is required for the remote data.root {root!r}')
        remote, local = f'{root.rstrip("/")}/{split}', os.path.join(local_cache, split)
    else:
        remote, local = None, os.path.join(root, split)
        decompress_on_local_leader(local)
    workarounds.streaming_releases_probed_blocks()
    dataset = StoryDataset(
        remote=remote,
        local=local,
        shuffle=shuffle,
        shuffle_seed=seed,
        shuffle_algo=shuffle_algo,
        num_canonical_nodes=num_canonical_nodes,
        batch_size=batch_size,
        validate_hash='xxh64' if remote else None,  # Local shards were checked by `check_split`.
    )
    # A private generator: starting an iterator (e.g. for an evaluation) must not draw from the
    # global torch RNG, or a resumed run samples different noise levels than an uninterrupted one.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_stories,
    )


HOST_INDEX = 'host_index'


def collate_stories(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stacks a batch; its sample indices also stay on the host, as a list under `host_index`.

    Composer moves tensors to the device and leaves lists where they are (splitting both into
    the same microbatches), so host-side choices (the self-conditioning coins) read the indices
    without waiting for the device.
    """
    batch = default_collate(samples)
    batch[HOST_INDEX] = batch['index'].tolist()
    return batch


def fetch_dataset_files(root: str, local_cache: str | None) -> str:
    """A local directory with the dataset's metadata file and tokenizer.

    A local root is returned as is; for an object-store root the two are downloaded into
    `local_cache` (shards are left to Streaming).
    """
    if not is_remote(root):
        return root
    if local_cache is None:
        raise ValueError(f'data.local_cache is required for the remote data.root {root!r}')
    store = Folder(root)
    if store.read_json(METADATA_FILE) is None:
        raise ValueError(
            f'{root}/{METADATA_FILE} not found: data.root is not a complete dataset; create it with '
            f'`python data_prep/convert_tinystories.py --out_root {root}` (or rerun an interrupted one)'
        )
    store.fetch_file(METADATA_FILE, os.path.join(local_cache, METADATA_FILE))
    store.fetch_directory(TOKENIZER_DIR, os.path.join(local_cache, TOKENIZER_DIR))
    return local_cache


def clean_shared_memory(root: str, local_cache: str | None, splits: tuple[str, ...]) -> None:
    """Removes the Streaming shared memory a killed run left for this run's local cache, and nothing else.

    Streaming refuses to open a remote dataset whose local cache directory is registered in
    shared memory, and cannot tell a killed run's registration from a live one, so the memory
    registered for our cache directories must go before the datasets are built. Streaming's own
    `clean_stale_shared_memory` unlinks every registration on the machine instead, the live ones
    of other jobs (or of another node's ranks on the same host) included. A dataset read in place
    (a local root) is never checked for overlap, so then nothing is cleaned. Local rank 0 cleans
    while the other ranks wait.

    Args:
        root: The dataset root (`data.root`).
        local_cache: Its local cache (`data.local_cache`), for an object-store root.
        splits: The splits this run reads.
    """
    workarounds.require('clean_shared_memory')
    ranks = composer_dist()
    if is_remote(root) and local_cache is not None and (ranks is None or ranks.get_local_rank() == 0):
        ours = {os.path.abspath(os.path.join(local_cache, split)) for split in splits}
        for prefix_int in _registered_prefixes():
            try:  # Streaming's wrapper: attaching must not hand the block to our resource tracker
                registered = SharedMemory(
                    streaming_prefix._get_path(prefix_int, LOCALS), False, auto_cleanup=False
                )
            except (FileNotFoundError, PermissionError):
                continue
            their_locals, _ = _unpack_locals(bytes(registered.buf))
            registered.shm.close()
            if ours & {os.path.abspath(d) for d in their_locals}:
                log.warning('removing stale Streaming shared memory %06d of %s', prefix_int, their_locals)
                _unlink_prefix(prefix_int)
    if ranks is not None:
        ranks.barrier()


def _registered_prefixes() -> list[int]:
    """The Streaming prefix ints in use here: up to the first with neither shared memory nor file locks."""
    found, prefix_int = [], 0
    while _in_use(prefix_int):
        found.append(prefix_int)
        prefix_int += 1
    return found


def _in_use(prefix_int: int) -> bool:
    """Whether a prefix has a file lock (in the temp folder) or a shared-memory block (in /dev/shm)."""
    name = streaming_prefix._get_path
    locks = (os.path.join(tempfile.gettempdir(), name(prefix_int, lock)) for lock in FILELOCKS)
    blocks = (os.path.join('/dev/shm', name(prefix_int, block)) for block in SHM_TO_CLEAN)
    return any(os.path.exists(path) for path in (*locks, *blocks))


def _unlink_prefix(prefix_int: int) -> None:
    """Unlinks every shared-memory block of one Streaming prefix (those already gone are skipped)."""
    for name in SHM_TO_CLEAN:
        try:
            block = BuiltinSharedMemory(streaming_prefix._get_path(prefix_int, name), False, 4)
        except (FileNotFoundError, PermissionError):
            continue
        block.close()
        block.unlink()
