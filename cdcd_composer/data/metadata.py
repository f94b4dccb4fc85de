"""A converted dataset's description, `cdcd_dataset.json`: canvas, ids, layout, tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from transformers import PreTrainedTokenizerBase

from cdcd_composer.story_tokens import tokenizer_sha256

METADATA_FILE = 'cdcd_dataset.json'
TOKENIZER_DIR = 'tokenizer'
SPLITS = ('train', 'val')


@dataclass
class DatasetMetadata:
    """What a reader must know about a dataset; saved as `cdcd_dataset.json` beside the splits.

    Written last by the converter: its presence marks a complete dataset. Each split's
    `manifest.json` holds the detailed counts and statistics.
    """

    seq_len: int
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    layout: str  # 'padded' (one story per example, pads are targets) or 'packed'.
    source: str
    tokenizer: str  # Name or path the tokenizer came from; the exact copy is in `tokenizer/`.
    num_examples: dict[str, int]
    num_truncated: dict[str, int]
    overflow: str = 'truncate'  # Over-long stories: 'truncate' or 'split' across examples.
    token_dtype: str = 'int32'
    settings: dict = field(default_factory=dict)  # Every converter option that shaped the data.
    tokenizer_sha256: str | None = None  # `tokenizer_sha256` of `tokenizer/` (None: older datasets).

    def to_json(self) -> dict:
        """A JSON-safe dict (the file's content)."""
        return asdict(self)

    @classmethod
    def from_json(cls, blob: dict) -> DatasetMetadata:
        """Inverse of `to_json`; unknown keys (from a newer converter) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in blob.items() if k in names})

    @classmethod
    def load(cls, root: str) -> DatasetMetadata:
        """Reads `root/cdcd_dataset.json` (local path).

        Raises:
            ValueError: the file is missing (no dataset, or an interrupted conversion), unreadable,
                or lacks a key or has one of the wrong type (one line naming the file and the key).
        """
        path = os.path.join(root, METADATA_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f'{path} not found: data root {root!r} is not a complete dataset; create it with '
                f'`python data_prep/convert_tinystories.py --out_root {root}` (or rerun an interrupted one)'
            )
        fix = f'rebuild it with `python data_prep/convert_tinystories.py --out_root {root} --overwrite`'
        try:
            with open(path) as f:
                blob = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'{path} cannot be read ({getattr(e, "strerror", None) or e}); {fix}') from None
        problem = schema_problem(blob)
        if problem:
            raise ValueError(f'{path}: {problem}; {fix}')
        return cls.from_json(blob)


# The keys every cdcd_dataset.json holds, and their JSON types; the ids must be >= 0, sizes > 0.
SCHEMA = {'seq_len': int, 'vocab_size': int, 'bos_id': int, 'eos_id': int, 'pad_id': int, 'layout': str,
          'source': str, 'tokenizer': str, 'num_examples': dict, 'num_truncated': dict}  # fmt: skip


def schema_problem(blob: Any) -> str | None:
    """What makes `blob` no `cdcd_dataset.json` (None: it is one)."""
    if not isinstance(blob, dict):
        return 'it holds no mapping of keys'
    for key, kind in SCHEMA.items():
        if key not in blob:
            return f'it lacks the key {key!r}'
        if not isinstance(blob[key], kind) or isinstance(blob[key], bool):
            return f'{key}={blob[key]!r} is not a {kind.__name__}'
    if blob['seq_len'] <= 0 or blob['vocab_size'] <= 0:
        return f'seq_len={blob["seq_len"]} and vocab_size={blob["vocab_size"]} must be positive'
    for key in ('bos_id', 'eos_id', 'pad_id'):
        if not 0 <= blob[key] < blob['vocab_size']:
            return f'{key}={blob[key]} is outside the vocabulary (vocab_size={blob["vocab_size"]})'
    return None


def check_tokenizer(meta: DatasetMetadata, tokenizer: PreTrainedTokenizerBase, whose: str, root: str) -> None:
    """The tokenizer is the one the shards were written with (by hash, when the dataset records one).

    Raises:
        ValueError: one line naming both and the fix.
    """
    if meta.vocab_size != len(tokenizer):
        raise ValueError(
            f'{root}/cdcd_dataset.json says vocab_size {meta.vocab_size}, but {whose} has {len(tokenizer)} '
            'tokens: the file was edited or mixed with another dataset; rebuild it with '
            f'`python data_prep/convert_tinystories.py --out_root {root} --overwrite`'
        )
    if meta.tokenizer_sha256 is not None and tokenizer_sha256(tokenizer) != meta.tokenizer_sha256:
        raise ValueError(
            f'{whose} is not the tokenizer the shards in {root} were written with (its SHA-256 differs '
            'from cdcd_dataset.json): token ids would not match; use the data it was trained on, or rebuild '
            f'the dataset with `python data_prep/convert_tinystories.py --out_root {root} --overwrite`'
        )
