"""Text in, text out: conditioning canvases, the sampler, decoding.

Shared by `generate.py`, `eval.py` and the training-samples callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from cdcd_composer.model import CDCDTransformer
from cdcd_composer.prompting import prompt_canvas, template_canvas
from cdcd_composer.sampler import SamplerSettings, decode_samples, sample
from cdcd_composer.time_warping import TimeWarp


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


def generate_tokens(
    model: CDCDTransformer,
    tokenizer: PreTrainedTokenizerBase,
    time_distribution: TimeWarp,
    seq_len: int,
    *,
    num_samples: int,
    steps: int,
    settings: SamplerSettings,
    request: Request | None = None,
    padded: bool = True,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(num_samples, seq_len) sampled token ids over `steps` warped steps, seeded."""
    if num_samples <= 0 or steps <= 0:
        raise ValueError(f'the number of samples ({num_samples}) and steps ({steps}) must be positive')
    given, mask = (request or Request()).canvas(tokenizer, seq_len, padded)
    if given is not None:
        given, mask = given.expand(num_samples, -1), mask.expand(num_samples, -1)
    device = next(model.parameters()).device
    return sample(
        model,
        time_distribution.sampling_timesteps(steps),
        num_samples,
        seq_len,
        settings,
        given_tokens=given,
        generate_mask=mask,
        generator=torch.Generator(device=device).manual_seed(seed),
        on_step=on_step,
    )


def generate_texts(
    model: CDCDTransformer,
    tokenizer: PreTrainedTokenizerBase,
    time_distribution: TimeWarp,
    seq_len: int,
    eos_id: int,
    **kwargs,
) -> list[str]:
    """`generate_tokens` decoded to text, each cut at its end-of-story token."""
    tokens = generate_tokens(model, tokenizer, time_distribution, seq_len, **kwargs)
    return decode_samples(tokens, tokenizer, eos_id)
