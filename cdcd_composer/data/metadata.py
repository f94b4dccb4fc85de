"""A converted dataset's description, `cdcd_dataset.json`: canvas, ids, layout, tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from transformers import PreTrainedTokenizerBase

from cdcd_composer.data.tokenization import tokenizer_sha256

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
            ValueError: the file is missing (no dataset, or an interrupted conversion).
        """
        path = os.path.join(root, METADATA_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f'{path} not found: data root {root!r} is not a complete dataset; create it with '
                f'`python data_prep/convert_tinystories.py --out_root {root}` (or rerun an interrupted one)'
            )
        with open(path) as f:
            return cls.from_json(json.load(f))


def check_tokenizer(meta: DatasetMetadata, tokenizer: PreTrainedTokenizerBase, whose: str, root: str) -> None:
    """The tokenizer is the one the shards were written with (by hash, when the dataset records one).

    Raises:
        ValueError: one line naming both and the fix.
    """
    if meta.tokenizer_sha256 is not None and tokenizer_sha256(tokenizer) != meta.tokenizer_sha256:
        raise ValueError(
            f'{whose} is not the tokenizer the shards in {root} were written with (its SHA-256 differs '
            'from cdcd_dataset.json): token ids would not match; use the data it was trained on, or rebuild '
            f'the dataset with `python data_prep/convert_tinystories.py --out_root {root} --overwrite`'
        )
