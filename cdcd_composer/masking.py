"""Conditioning masks (paper §4.1, §6.1; SED §3.2): which tokens are given and which are generated."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MASK_KINDS = ('prefix', 'random', 'span')


@dataclass
class MaskingConfig:
    """Per-example mixture of conditioning masks.

    The weights of `prefix`, `random` and `span` are relative (normalised to sum to one); a
    fraction `drop` of examples is left fully unconditional (every position generated), which
    is what classifier-free guidance needs.
    """

    prefix: float = 0.5  # Given: the first k story tokens, k ~ U{0, ..., n-1}.
    random: float = 0.5  # Given: a uniform random subset of c story tokens, c ~ U{0, ..., n-1}.
    span: float = 0.0  # Generated: one random span of the story (infilling); the rest is given.
    drop: float = 0.1  # Examples with no conditioning at all.

    def __post_init__(self) -> None:
        weights = (self.prefix, self.random, self.span)
        if not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:  # NaN fails `0 <= w`
            raise ValueError(f'masking weights prefix/random/span must be >= 0 and not all 0, got {weights}')
        if not 0.0 <= self.drop <= 1.0:
            raise ValueError(f'masking.drop={self.drop} must lie in [0, 1]')


def story_lengths(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Number of non-pad tokens of each example: (B, L) -> (B,) int64 (stories are left-aligned)."""
    return (tokens != pad_id).sum(-1)


def sample_generate_mask(
    tokens: torch.Tensor,
    pad_id: int,
    config: MaskingConfig,
    uniform: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draws one conditioning mask per example.

    Only story tokens can be given: padding is a target of the fixed-canvas layout (it tells
    the model where the story ends), so a given pad would leak the story's length.

    Args:
        tokens: (B, L) token ids, stories left-aligned and followed by `pad_id`.
        pad_id: The padding id of the dataset.
        config: Mixture weights and the unconditional fraction.
        uniform: Draws `uniform(B, *shape)` uniforms in (0, 1) (`SampleDraws.columns`: each row a
            function of its sample); None: `torch.rand` from the global generator.

    Returns:
        (B, L) bool, True where the token is generated (m = 1), False where it is given.
    """
    batch, length = tokens.shape
    device = tokens.device

    if uniform is None:

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, device=device)

    n = story_lengths(tokens, pad_id)  # (B,)
    position = torch.arange(length, device=device)[None, :]  # (1, L)
    in_story = position < n[:, None]

    # prefix: given = position < k
    k = (uniform(batch) * n).floor().long()
    prefix_given = position < k[:, None]
    # random: given = the c story positions with the smallest random scores
    c = (uniform(batch) * n).floor().long()
    scores = uniform(batch, length).masked_fill(~in_story, 2.0)
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    random_given = rank < c[:, None]
    # span: generated = [start, start + width) inside the story, the rest of the story given
    start = (uniform(batch) * n).floor().long()
    width = 1 + (uniform(batch) * (n - start)).floor().long()
    inside = (position >= start[:, None]) & (position < (start + width)[:, None])
    span_given = in_story & ~inside

    # The kind by inverse CDF of the mixture weights (multinomial would check its input with a
    # host sync). The weights are Python floats, so no tensor travels to the device.
    total = config.prefix + config.random + config.span
    u = uniform(batch) * total
    kind = (u >= config.prefix).long() + (u >= config.prefix + config.random).long()  # (B,) 0, 1 or 2
    given = torch.stack([prefix_given, random_given, span_given], dim=1)[
        torch.arange(batch, device=device), kind
    ]
    dropped = uniform(batch) < config.drop
    given = given & in_story & ~dropped[:, None]
    return ~given
