"""Stories as fixed-canvas token sequences in MosaicML Streaming MDS shards, written and read back."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from streaming import MDSWriter, StreamingDataset
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from cdcd_composer.tokenization import StoryTokens

log = logging.getLogger(__name__)

METADATA_FILE = 'cdcd_dataset.json'
TOKENIZER_DIR = 'tokenizer'
SPLITS = ('train', 'val')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


@dataclass
class DatasetMetadata:
    """What a reader must know about a dataset; saved as `cdcd_dataset.json` beside the splits."""

    seq_len: int
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    layout: str  # 'padded': one story per example, padded to the canvas with pad as a target.
    source: str
    tokenizer: str  # Name or path the tokenizer came from; the exact copy is in `tokenizer/`.
    num_examples: dict[str, int]
    num_truncated: dict[str, int]

    def save(self, root: str) -> None:
        """Writes the metadata file into the local directory `root`."""
        with open(os.path.join(root, METADATA_FILE), 'w') as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, root: str) -> DatasetMetadata:
        """Reads `root/cdcd_dataset.json` (local path).

        Raises:
            ValueError: the file is missing or was written by something else.
        """
        path = os.path.join(root, METADATA_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f'{path} not found: data root {root!r} is not a dataset; create one with '
                f'`python data_prep/convert_tinystories.py --out_root {root}`'
            )
        with open(path) as f:
            return cls(**json.load(f))


def encode_stories(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, counts: dict[str, int]
) -> Iterator[np.ndarray]:
    """Tokenizes stories onto a fixed canvas: `[bos] story [eos] [pad]...`, shape (seq_len,) int32.

    A story longer than the canvas is truncated (it then has no end-of-story token);
    `counts['truncated']` and `counts['examples']` are incremented as a side channel.
    """
    ids = StoryTokens.of(tokenizer)
    for text in texts:
        body = tokenizer(text.strip(), add_special_tokens=False)['input_ids']
        tokens = [ids.bos, *body, ids.eos]
        if len(tokens) > seq_len:
            tokens = tokens[:seq_len]
            counts['truncated'] += 1
        canvas = np.full(seq_len, ids.pad, dtype=np.int32)
        canvas[: len(tokens)] = tokens
        counts['examples'] += 1
        yield canvas


def write_split(examples: Iterable[np.ndarray], out_dir: str, size_limit: str = '64mb') -> None:
    """Writes token arrays to MDS shards in `out_dir`, which must not exist yet.

    Shards are written to a temporary sibling and renamed into place at the end, so an
    interrupted write never leaves a directory that looks like a complete split.

    Raises:
        ValueError: `out_dir` already exists (remove it, or choose another `out_root`).
    """
    if os.path.exists(out_dir):
        raise ValueError(f'{out_dir} already exists: remove it or choose another --out_root')
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.', dir=parent)
    try:
        columns = {'tokens': 'ndarray:int32'}
        with MDSWriter(
            out=tmp, columns=columns, compression='zstd', hashes=['xxh64'], size_limit=size_limit
        ) as w:
            for tokens in examples:
                w.write({'tokens': tokens})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared.
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class StoryDataset(StreamingDataset):
    """A split of MDS token shards; yields `{'tokens': LongTensor (seq_len,)}`."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        # Streaming hands out read-only views of the shard: copy before making a tensor.
        return {'tokens': torch.from_numpy(sample['tokens'].astype(np.int64))}


def check_split(root: str, split: str) -> None:
    """Fails fast, before any model is built, when a local split is missing.

    Raises:
        ValueError: no `index.json` under `root/split`.
    """
    if '://' in root:
        return  # Remote roots are checked by Streaming when it downloads the index.
    index = os.path.join(root, split, 'index.json')
    if not os.path.isfile(index):
        raise ValueError(
            f'{index} not found: data.root {root!r} has no {split!r} split; create it with '
            f'`python data_prep/convert_tinystories.py --out_root {root}` or fix data.root'
        )


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
    """
    check_split(root, split)
    if '://' in root:
        if local_cache is None:
            raise ValueError(f'data.local_cache is required for the remote data.root {root!r}')
        remote, local = f'{root.rstrip("/")}/{split}', os.path.join(local_cache, split)
    else:
        remote, local = None, os.path.join(root, split)
    dataset = StoryDataset(
        remote=remote, local=local, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size
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
    )


def fetch_dataset_files(root: str, local_cache: str | None) -> str:
    """A local directory with the dataset's metadata file and tokenizer.

    A local root is returned as is; for an object-store root the two are downloaded into
    `local_cache` (shards are left to Streaming).
    """
    if '://' not in root:
        return root
    if local_cache is None:
        raise ValueError(f'data.local_cache is required for the remote data.root {root!r}')
    from composer.utils import get_file

    for name in (METADATA_FILE, *(f'{TOKENIZER_DIR}/{f}' for f in TOKENIZER_FILES)):
        get_file(
            f'{root.rstrip("/")}/{name}', os.path.join(local_cache, name), overwrite=True, progress_bar=False
        )
    return local_cache


def clean_shared_memory() -> None:
    """Removes Streaming shared memory left by a killed run; call once before building datasets."""
    clean_stale_shared_memory()
