"""Sampling: the Euler ODE sampler with score interpolation (§6.1), and decoding samples to text."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from cdcd_composer.model import CDCDTransformer


@torch.no_grad()
def euler_sample(
    model: CDCDTransformer,
    timesteps: torch.Tensor,
    num_samples: int,
    seq_len: int,
    *,
    given_tokens: torch.Tensor | None = None,
    generate_mask: torch.Tensor | None = None,
    self_conditioning: bool = False,
    score_temperature: float = 1.0,
    initial_noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrates the probability-flow ODE from t_max to t_min, then takes the argmax.

    With x0_hat = softmax(logits) @ E (score interpolation), each step is
    d = (x - x0_hat) / (t_i * tau) and x <- x + (t_{i+1} - t_i) * d.

    Args:
        model: The denoiser (in eval mode).
        timesteps: (n_steps + 1,) decreasing noise levels, first t_max, last t_min.
        num_samples: Batch size B.
        seq_len: Canvas length L.
        given_tokens: (B, L) token ids kept clean where `generate_mask` is 0 (prompts, infilling).
        generate_mask: (B, L) 1 where tokens are generated; default all ones.
        self_conditioning: Feed the previous step's x0_hat back as the self-conditioning input.
        score_temperature: tau; below 1 trades entropy for likelihood.
        initial_noise_scale: s_init; x starts from N(0, (s_init * t_max)^2 I).
        generator: Random generator for the initial noise (determinism by seed).
        on_step: Called with the step index after each step (progress bars).

    Returns:
        (B, L) int64 token ids; given positions hold `given_tokens`.
    """
    device = next(model.parameters()).device
    d_embed = model.config.d_embed
    timesteps = timesteps.to(device=device, dtype=torch.float32)
    if generate_mask is None:
        generate_mask = torch.ones(num_samples, seq_len, dtype=torch.bool, device=device)
    if given_tokens is None:
        given_tokens = torch.zeros(num_samples, seq_len, dtype=torch.long, device=device)
    noise = torch.randn(num_samples, seq_len, d_embed, generator=generator, device=device)
    x = noise * timesteps[0] * initial_noise_scale
    self_cond = torch.zeros_like(x)
    for i in range(len(timesteps) - 1):
        t_i, t_next = timesteps[i], timesteps[i + 1]
        _, x0_hat = model(
            given_tokens,
            t_i.expand(num_samples),
            generate_mask,
            self_cond,
            x_t=x,
            return_expected_embedding=True,
        )
        if self_conditioning:
            self_cond = x0_hat
        x = x + (t_next - t_i) * (x - x0_hat) / (t_i * score_temperature)
        if on_step is not None:
            on_step(i)
    logits = model(given_tokens, timesteps[-1].expand(num_samples), generate_mask, self_cond, x_t=x)
    return torch.where(generate_mask.bool(), logits.argmax(-1), given_tokens)


def decode_samples(tokens: torch.Tensor, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> list[str]:
    """Decodes (B, L) ids to text, dropping everything from the first end-of-story token on.

    Position 0 holds the start token, so the search for the end starts at position 1.
    """
    texts = []
    for row in tokens.tolist():
        end = row.index(eos_id, 1) if eos_id in row[1:] else len(row)
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts
