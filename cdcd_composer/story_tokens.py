"""The ids that frame a story on the canvas, read from any tokenizer: transformers only.

The Hugging Face export copies this module into its modelling code (`cdcd_composer.hf`).
"""

from __future__ import annotations

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
