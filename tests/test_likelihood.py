"""The NLL bound: an oracle with the exact posterior mean lands on the true entropy, never below it."""

import math

import pytest
import torch

from cdcd_composer.likelihood import PROPOSALS, nll_bound, prior_kl, proposal_times

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
LOG_PROBS = PROBS.float().log()
EMBEDDINGS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # norm sqrt(2) = sqrt(D)


def posterior(tokens: torch.Tensor, log_prior: torch.Tensor):
    """The `Denoise` of i.i.d. tokens under `log_prior`: logits log pi_v - ||x_t - e_v||^2 / 2t^2."""
    x0 = EMBEDDINGS[tokens]

    def denoise(noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = x0 + t[:, None, None] * noise
        distance = (x_t[:, :, None, :] - EMBEDDINGS).square().sum(-1)  # (N, L, V)
        logits = log_prior - distance / (2 * t[:, None, None] ** 2)
        x0_hat = logits.softmax(-1) @ EMBEDDINGS
        return logits, (x0 - x0_hat).square().flatten(1).sum(-1)

    return denoise


def bound(tokens, log_prior=LOG_PROBS, seed=0, **kwargs):
    squared = EMBEDDINGS[tokens].square().flatten(1).sum(-1)
    generator = torch.Generator().manual_seed(seed)
    return nll_bound(
        tokens, posterior(tokens, log_prior), squared, 2, 1.0, 300.0, generator=generator, **kwargs
    )


@pytest.mark.parametrize('proposal', ['inverse_square', 'log_uniform'])
def test_with_the_exact_posterior_the_bound_is_the_entropy(proposal):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(PROBS.float(), 4000 * 8, replacement=True, generator=generator).view(4000, 8)
    exact = -PROBS.log()[tokens].sum(-1)  # -log p(w) per sequence, nats
    exact_model = bound(tokens, samples=16, proposal=proposal)
    gap = (exact_model.total - exact) / 8  # the bound's excess over the truth, nats per token
    stderr = float(gap.std()) / math.sqrt(len(gap))  # Monte Carlo error of the mean excess
    assert float(gap.mean()) > -3 * stderr  # never below the truth beyond Monte Carlo error
    assert float(gap.mean()) < 3 * stderr + 0.002  # and tight (the entropy is 1.21 nats/token)
    assert float(exact_model.prior.mean()) < 1e-3  # t_max = 300 >> ||e||: the prior costs nothing


def test_a_worse_denoiser_has_a_larger_bound():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.multinomial(PROBS.float(), 500 * 8, replacement=True, generator=generator).view(500, 8)

    exact_model = bound(tokens, seed=2)
    worse = bound(tokens, log_prior=torch.zeros(4), seed=2)  # ignores that token 0 is the most likely
    assert float(worse.total.mean()) > float(exact_model.total.mean()) + 8 * 0.05


def test_the_bound_is_repeatable_with_its_seed():
    tokens = torch.randint(0, 4, (4, 8), generator=torch.Generator().manual_seed(3))
    first, again = bound(tokens, seed=5), bound(tokens, seed=5)
    assert torch.equal(first.total, again.total) and torch.equal(first.stderr, again.stderr)


@pytest.mark.parametrize('proposal', ['inverse_square', 'log_uniform'])
def test_each_proposal_is_a_density_on_the_range(proposal):
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    t, density = proposal_times(u, 1.0, 300.0, proposal)
    assert float(t.min()) >= 1.0 and float(t.max()) <= 300.0 and (t[1:] > t[:-1]).all()
    # E_q[1/q(t)] = the length of the range: the density integrates to one.
    assert float((1.0 / density).mean()) == pytest.approx(299.0, rel=1e-3)
    assert set(PROPOSALS) >= {proposal}


def test_the_prior_kl_is_zero_only_at_the_prior():
    assert float(prior_kl(torch.zeros(1), 6, 300.0, prior_var=300.0**2)) == pytest.approx(0.0, abs=1e-12)
    assert float(prior_kl(torch.full((1,), 6.0), 6, 300.0)) > 0


@pytest.mark.parametrize('self_conditioning', [None, 0.5])
def test_the_eval_metric_is_the_models_bound_per_non_pad_token(self_conditioning):
    from conftest import TINY_MODEL

    from cdcd_composer.composer_model import NLL_BOUND, CDCDComposerModel

    model = CDCDComposerModel({**TINY_MODEL, 'vocab_size': 40}, self_conditioning=self_conditioning).eval()
    tokens = torch.randint(1, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    tokens[0, 8:] = 0  # padding (pad_id 0) is scored but not counted as a token
    outputs = model.eval_forward({'tokens': tokens})
    metric = model.get_metrics()[NLL_BOUND]
    model.update_metric({'tokens': tokens}, outputs, metric)
    expected = model.nll_bound(tokens, model.nll_bound_samples, seed=model.eval_seed + int(tokens.sum()))
    assert float(metric.compute()) == pytest.approx(float(expected.total.sum()) / (8 + 12 + 12), rel=1e-6)
    assert (expected.total > 0).all() and (expected.stderr > 0).all()
    # An untrained denoiser knows nothing: it pays at least the uniform code's ln V per token, nearly.
    assert float(expected.total.sum()) / 36 > 0.9 * math.log(40)


def test_the_exact_entropy_of_whole_stories_lies_below_any_models_bound(tmp_path):
    from conftest import TINY_MODEL

    from cdcd_composer.composer_model import CDCDComposerModel
    from cdcd_composer.data.conversion import convert
    from cdcd_composer.data.grammar import story_log_probability
    from cdcd_composer.data.metadata import DatasetMetadata
    from cdcd_composer.data.tokenization import load_tokenizer, tokenizer_to_json
    from cdcd_composer.evaluation_report import likelihood, validation_tokens
    from cdcd_composer.sampler import decode_samples

    root = tmp_path / 'synthetic'
    convert(
        source='synthetic', out_root=str(root), seq_len=256, num_train=64, num_val=16, train_tokenizer=1024
    )
    meta, tokenizer = DatasetMetadata.load(str(root)), load_tokenizer(str(root / 'tokenizer'))
    model = CDCDComposerModel(
        {**TINY_MODEL, 'vocab_size': meta.vocab_size}, dataset=meta, tokenizer=tokenizer_to_json(tokenizer)
    ).eval()
    val = validation_tokens(model, str(root), None, 16)
    result = likelihood(model, val, samples=4, batch_size=8, seed=0)
    counted = float((val != meta.pad_id).sum())
    stories = decode_samples(val, tokenizer, meta.eos_id)  # the canvases round-trip: P(canvas) = P(story)
    assert result['exact_entropy'] == pytest.approx(-sum(map(story_log_probability, stories)) / counted)
    assert 0 < result['exact_entropy'] < result['unigram_entropy']
    assert result['bound_per_token'] > result['exact_entropy']  # an untrained model: far above it
