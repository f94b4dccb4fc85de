import pytest
import torch

from cdcd_composer.masking import MaskingConfig, sample_generate_mask
from cdcd_composer.sample_draws import MASK, SampleDraws

PAD = 0


def canvas(lengths: list[int], length: int = 40) -> torch.Tensor:
    tokens = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(5, 50, (n,))
    return tokens


def draw(config: MaskingConfig, n: int = 20, batch: int = 20000) -> torch.Tensor:
    """Masks drawn as training draws them: per sample, from (seed, epoch, index)."""
    uniform = SampleDraws(seed=0, epoch=0, index=torch.arange(batch)).columns(MASK)
    return sample_generate_mask(canvas([n] * batch), PAD, config, uniform)


def test_padding_is_never_given():
    tokens = canvas([5, 17, 40, 2] * 500)
    mask = sample_generate_mask(tokens, PAD, MaskingConfig(prefix=1, random=1, span=1, drop=0.0))
    assert mask[tokens == PAD].all()


def test_prefix_lengths_are_uniform():
    mask = draw(MaskingConfig(prefix=1.0, random=0.0, drop=0.0))
    given = ~mask
    k = given.sum(-1)
    # A prefix: the given positions are exactly the first k.
    assert torch.equal(given, torch.arange(40)[None, :] < k[:, None])
    counts = torch.bincount(k, minlength=20)[:20].double() / len(k)
    assert k.max() <= 19 and (counts - 1 / 20).abs().max() < 0.01


def test_random_masks_have_uniform_counts_and_uniform_positions():
    given = ~draw(MaskingConfig(prefix=0.0, random=1.0, drop=0.0))
    c = given.sum(-1)
    counts = torch.bincount(c, minlength=20)[:20].double() / len(c)
    assert (counts - 1 / 20).abs().max() < 0.01
    # Every story position is equally likely to be given: E[c]/n = (n-1)/2n.
    per_position = given[:, :20].double().mean(0)
    assert (per_position - 19 / 40).abs().max() < 0.015


def test_span_masks_generate_one_contiguous_span():
    mask = draw(MaskingConfig(prefix=0.0, random=0.0, span=1.0, drop=0.0), batch=2000)
    story = mask[:, :20].int()
    # Exactly one run of generated positions inside the story, at least one token long.
    starts = (story[:, 1:] - story[:, :-1] == 1).sum(-1) + story[:, 0]
    assert (starts == 1).all()


def test_drop_rate_and_mixture_weights():
    mask = draw(MaskingConfig(prefix=0.5, random=0.5, drop=0.1))
    unconditional = mask.all(-1).double().mean()
    # Dropped examples plus those whose draw gave k = 0 (prefix) or c = 0 (random): 0.1 + 0.9 / 20.
    assert abs(unconditional - (0.1 + 0.9 / 20)) < 0.01


def test_bad_weights_fail_by_name():
    with pytest.raises(ValueError, match='masking weights'):
        MaskingConfig(prefix=0, random=0, span=0)
    with pytest.raises(ValueError, match='masking.drop'):
        MaskingConfig(drop=1.5)
