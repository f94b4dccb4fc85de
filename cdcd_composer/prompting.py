"""Conditioning canvases for sampling: a prompt to continue, or a template with blanks to fill.

A canvas is a pair (given_tokens, generate_mask), each of shape (seq_len,): the sampler keeps
given tokens clean and generates where the mask is 1. A `Request` says which canvas to make.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from cdcd_composer.story_tokens import StoryTokens

BLANK = '___'


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, what: str) -> list[int]:
    """The ids of `text` read as text, refusing what the tokenizer would silently lose.

    Control-token text such as `[SEP]` is split like any other word, never a control token.

    Raises:
        ValueError: one line naming `what`: text that is not valid UTF-8, or a word longer than the
            tokenizer reads (WordPiece turns it into one [UNK]).
    """
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as error:
        raise ValueError(f'{what} is not valid UTF-8 (byte {error.start}); pass UTF-8 text') from None
    limit = getattr(getattr(tokenizer.backend_tokenizer, 'model', None), 'max_input_chars_per_word', None)
    longest = max(text.split(), key=len, default='')
    if limit and len(longest) > limit:
        raise ValueError(
            f'{what} has a word of {len(longest)} characters ({longest[:20]}...); the tokenizer reads '
            f'at most {limit} per word and would turn it into one unknown token: break it up'
        )
    if not text.strip():
        return []
    return tokenizer(text.strip(), add_special_tokens=False, split_special_tokens=True)['input_ids']


def _check_fits(what: str, n: int, seq_len: int) -> None:
    if n > seq_len:
        raise ValueError(f'{what} takes {n} tokens but the canvas holds {seq_len}; shorten it')


def prompt_canvas(
    tokenizer: PreTrainedTokenizerBase, seq_len: int, prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[bos] prompt` given, everything after it generated.

    Raises:
        ValueError: the prompt does not leave room on the canvas.
    """
    ids = StoryTokens.of(tokenizer)
    given = [ids.bos, *_encode(tokenizer, prompt, '--prompt')]
    _check_fits(f'--prompt {prompt!r}', len(given) + 1, seq_len)
    tokens = torch.full((seq_len,), ids.pad, dtype=torch.long)
    tokens[: len(given)] = torch.tensor(given)
    mask = torch.ones(seq_len, dtype=torch.bool)
    mask[: len(given)] = False
    return tokens, mask


def template_canvas(
    tokenizer: PreTrainedTokenizerBase, seq_len: int, template: str, blank_length: int, padded: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A story with blanks: `Once upon a time ___ . The end.` -> given text, generated blanks.

    Each `___` is `blank_length` generated tokens; a template ending in `___` leaves the rest of
    the canvas to generate. Otherwise the story ends where the template ends: `[eos]` is given
    after it, and the padding after that too when the data was `padded` (one story per canvas).

    Raises:
        ValueError: no blank, a non-positive blank length, or a template longer than the canvas.
    """
    if BLANK not in template:
        raise ValueError(f'--template {template!r} has no {BLANK} blank to fill; add one or use --prompt')
    if blank_length <= 0:
        raise ValueError(f'--blank_length must be positive, got {blank_length}')
    ids = StoryTokens.of(tokenizer)
    pieces = template.split(BLANK)
    open_end = not pieces[-1].strip()
    tokens, mask = [ids.bos], [False]
    for i, piece in enumerate(pieces):
        encoded = _encode(tokenizer, piece, '--template')
        tokens += encoded
        mask += [False] * len(encoded)
        if i < len(pieces) - 1 and not (open_end and i == len(pieces) - 2):
            tokens += [ids.pad] * blank_length
            mask += [True] * blank_length
    if not open_end:
        tokens.append(ids.eos)
        mask.append(False)
    _check_fits(
        f'--template {template!r} with --blank_length {blank_length}', len(tokens) + open_end, seq_len
    )
    rest = seq_len - len(tokens)
    tokens += [ids.pad] * rest
    mask += [open_end or not padded] * rest
    return torch.tensor(tokens), torch.tensor(mask)


@dataclass
class Request:
    """What to generate.

    Unconditional (neither set), a continuation (`prompt`) or an infill (`template` with `___`
    blanks of `blank_length` tokens).
    """

    prompt: str | None = None
    template: str | None = None
    blank_length: int = 8

    def canvas(
        self, tokenizer: PreTrainedTokenizerBase, seq_len: int, padded: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """(given_tokens, generate_mask), each (seq_len,), or (None, None) when unconditional."""
        if self.prompt is not None and self.template is not None:
            raise ValueError('give --prompt or --template, not both')
        if self.prompt is not None:
            return prompt_canvas(tokenizer, seq_len, self.prompt)
        if self.template is not None:
            return template_canvas(tokenizer, seq_len, self.template, self.blank_length, padded)
        return None, None

    def given(
        self, tokenizer: PreTrainedTokenizerBase, seq_len: int, padded: bool, num_samples: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The canvas for each of `num_samples`: (given_tokens, generate_mask), each (N, L), or None."""
        tokens, mask = self.canvas(tokenizer, seq_len, padded)
        return None if tokens is None else (tokens.expand(num_samples, -1), mask.expand(num_samples, -1))
