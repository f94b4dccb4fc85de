"""The ids that frame a story on the canvas, read from any tokenizer: transformers only.

The Hugging Face export copies this module into its modelling code (`cdcd_composer.hf`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class StoryTokens:
    """The ids that frame a story on the canvas: `[bos] story [eos] [pad] ...`."""

    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> StoryTokens:
        """Reads the ids from a tokenizer, preferring BERT's [CLS]/[SEP], else BOS/EOS.

        Raises:
            ValueError: the tokenizer has no end-of-story or no padding token.
        """
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if eos is None:
            raise ValueError(
                f'tokenizer {tokenizer.name_or_path!r} has no [SEP]/eos token; choose another tokenizer'
            )
        if pad is None:
            # GPT-style tokenizers have no pad token; the end-of-story token is the usual stand-in.
            pad = eos
        return cls(bos=bos if bos is not None else eos, eos=eos, pad=pad)


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hex SHA-256 of a fast tokenizer's serialised form (vocabulary with ids, rules, specials).

    Training a WordPiece vocabulary is not reproducible: the `tokenizers` trainer breaks ties
    in an order that changes between processes (three identical runs gave different ids). So a
    dataset records the hash of the tokenizer its shards were written with, and every reader
    checks it instead of assuming that equal settings mean equal ids.
    """
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
