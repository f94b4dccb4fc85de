import math

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODEL

from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.model import CDCDConfig, CDCDTransformer, c_in, rotary, score, vocabulary_cross_entropy

VOCAB = 50


@pytest.fixture
def wrapper() -> CDCDComposerModel:
    return CDCDComposerModel({'vocab_size': VOCAB, **TINY_MODEL}, t_min=1.0, t_max=300.0)


def _batch(b: int = 3, length: int = 12) -> dict:
    return {'tokens': torch.randint(0, VOCAB, (b, length))}


def test_tiny_model_has_a_few_thousand_parameters(wrapper):
    assert 1_000 < wrapper.model.non_embedding_parameters() < 50_000


def test_normalised_embeddings_have_norm_sqrt_d(wrapper):
    model = wrapper.model
    d = model.config.d_embed
    rows = model.embedding_matrix().norm(dim=-1)
    torch.testing.assert_close(rows, torch.full((VOCAB,), math.sqrt(d)))
    tokens = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(model.embed(tokens), model.embedding_matrix()[tokens])
    # Tab. 1 init: the raw table is tiny, the normalised one is not.
    assert model.embedding.weight.std() < 0.01


def test_expected_embedding_and_score_match_closed_forms(wrapper):
    model = wrapper.model
    logits = torch.randn(2, 4, VOCAB)
    x0_hat = model.expected_embedding(logits)
    manual = torch.einsum('blv,vd->bld', logits.softmax(-1), model.embedding_matrix())
    torch.testing.assert_close(x0_hat, manual)
    x = torch.randn(2, 4, model.config.d_embed)
    t = torch.tensor([2.0, 5.0])
    torch.testing.assert_close(score(x0_hat, x, t), (x0_hat - x) / t[:, None, None] ** 2)
    # A one-hot prediction gives exactly that token's embedding.
    sharp = torch.full((1, 1, VOCAB), -1e4)
    sharp[0, 0, 7] = 1e4
    torch.testing.assert_close(model.expected_embedding(sharp)[0, 0], model.embedding_matrix()[7])


def test_c_in_scales_unit_variance_inputs():
    t = torch.tensor([1.0, 10.0, 300.0])
    x = torch.randn(20000, 3) * torch.sqrt(1 + t**2)  # e (std 1) + t * eps
    assert torch.allclose((x * c_in(t)).std(0), torch.ones(3), atol=0.03)


def test_given_positions_carry_no_loss_and_no_noise(wrapper):
    batch = wrapper.corrupt(_batch())
    mask = torch.ones_like(batch['tokens'], dtype=torch.bool)
    mask[:, :5] = False
    batch['generate_mask'] = mask
    out = wrapper(batch)
    ce = vocabulary_cross_entropy(out['logits'], batch['tokens'])
    torch.testing.assert_close(out['loss'], ce[:, 5:].mean())
    torch.testing.assert_close(out['ce_per_sequence'], ce[:, 5:].mean(-1))
    # Given positions ignore the noise entirely: the output is the same for any noise there.
    wrapper.eval()
    with torch.no_grad():
        args = (batch['tokens'], batch['t'], mask, batch['self_cond'])
        same_inputs = wrapper.model(*args, noise=batch['noise']).logits
        noise2 = batch['noise'].clone()
        noise2[:, :5] = torch.randn_like(noise2[:, :5]) * 100
        moved = wrapper.model(*args, noise=noise2).logits
        # x_t given directly (sampling) is the same computation as tokens + noise (training).
        x_t = wrapper.model.embed(batch['tokens']) + batch['t'][:, None, None] * batch['noise']
        direct = wrapper.model(*args, x_t=x_t).logits
    torch.testing.assert_close(same_inputs, moved)
    torch.testing.assert_close(same_inputs, direct)


def test_forward_reports_pairs_for_time_warping(wrapper):
    out = wrapper(_batch(b=6))
    assert out['ce_per_sequence'].shape == (6,) and out['t'].shape == (6,)
    assert not out['ce_per_sequence'].requires_grad
    assert ((out['t'] >= 1.0) & (out['t'] <= 300.0)).all()
    # Low-discrepancy: one t per stratum of width 1/B.
    u = torch.sort((out['t'] - 1.0) / 299.0).values
    assert ((u >= torch.arange(6) / 6) & (u < (torch.arange(6) + 1) / 6)).all()


def test_time_conditioning_starts_as_plain_layernorm(wrapper):
    model = wrapper.model
    batch = wrapper.corrupt(_batch())
    x = batch['noise']
    args = (batch['tokens'], batch['generate_mask'], batch['self_cond'])
    t, t7 = batch['t'], batch['t'] * 7

    def run(x_t, times):
        return model(args[0], times, *args[1:], x_t=x_t).logits

    # adaLN is zero-initialised, so at init t only enters through c_in(t) scaling the input.
    rescaled = x * (c_in(t7) / c_in(t))[:, None, None]
    torch.testing.assert_close(run(x, t7), run(rescaled, t))
    assert not torch.allclose(run(x, t), run(x, t7))


def test_rotary_attention_depends_on_relative_position_only():
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    scores = rotary(q) @ rotary(k).transpose(-1, -2)  # (1, 1, 10, 10)
    torch.testing.assert_close(scores[0, 0, 2, 5], scores[0, 0, 4, 7])
    torch.testing.assert_close(rotary(q).norm(dim=-1), q.norm(dim=-1))


def test_flops_per_batch_is_three_forwards(wrapper):
    batch = _batch(b=4, length=16)
    n = sum(p.numel() for n_, p in wrapper.model.named_parameters() if n_.endswith('weight') and p.ndim == 2)
    flops = wrapper.flops_per_batch(batch)
    assert flops == 3 * wrapper.forward_flops(4, 16)
    assert 0.5 * 6 * n * 64 < flops < 2 * 6 * n * 64


@pytest.mark.parametrize('name, target', [('cdcd-5m', 4.87e6), ('cdcd-140m', 139.4e6)])
def test_parameter_counts_match_the_earlier_reproduction(name, target):
    cfg = yaml.safe_load((REPO / 'yamls' / f'{name}.yaml').read_text())['model']
    cfg['vocab_size'] = cfg.get('vocab_size') or 30522
    with torch.device('meta'):
        model = CDCDTransformer(CDCDConfig(**cfg))
    assert abs(model.non_embedding_parameters() / target - 1) < 0.05


def test_bad_architecture_fails_by_name():
    with pytest.raises(ValueError, match='n_heads'):
        CDCDConfig(vocab_size=10, d_model=30, n_heads=4)


def test_the_model_state_holds_its_time_warp_and_run_spec(wrapper):
    """A checkpoint or export is the model's state: the warp's tensors and the run spec are in it."""
    from cdcd_composer.run_spec import RunSpec
    from cdcd_composer.time_warping import TimeWarp

    warp = TimeWarp(1.0, 300.0, n_bins=10)
    t = warp.sample_t(4096, generator=torch.Generator().manual_seed(0)).double()
    assert warp.fit(t, 3.0 * (t / 300.0).sqrt() + 0.05 * torch.randn(len(t), dtype=torch.float64)).accepted
    wrapper.time_warp = warp
    state = wrapper.state_dict()
    assert {'time_warp.masses', 'time_warp.fit_heights', 'time_warp.fit_offset'} <= set(state)
    assert RunSpec.from_json(state['_extra_state']) == wrapper.spec
    restored = CDCDComposerModel.from_spec(wrapper.spec, n_bins=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.time_warp.masses, warp.masses) and restored.time_warp.is_fitted
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(restored.time_warp.inverse_cdf(grid), warp.inverse_cdf(grid))
    with pytest.raises(ValueError, match='has 10 bins, the config 100'):
        CDCDComposerModel.from_spec(wrapper.spec).load_state_dict(state)
    without_warp = {k: v for k, v in state.items() if not k.startswith('time_warp.')}
    with pytest.raises(ValueError, match='holds no time warp in its model state'):
        restored.load_state_dict(without_warp)
    other = CDCDComposerModel({'vocab_size': VOCAB, **TINY_MODEL, 'n_layers': 3})
    other.time_warp = TimeWarp(1.0, 300.0, n_bins=10)
    with pytest.raises(ValueError, match='trained with a different model config'):
        other.load_state_dict(state, strict=False)


@pytest.mark.parametrize('preconditioning', ['cdcd', 'tanh'])
def test_denoiser_forward_is_one_graph_for_torch_compile(preconditioning):
    """`compile_config` compiles the whole denoiser: training, self-conditioning and sampling calls."""
    model = CDCDComposerModel(
        {'vocab_size': VOCAB, **TINY_MODEL, 'preconditioning': preconditioning},
        masking={'prefix': 0.5, 'random': 0.5, 'span': 0.0, 'drop': 0.1},
    )
    batch = model.corrupt(_batch())
    denoiser = model.model
    args = (batch['tokens'], batch['t'], batch['generate_mask'], batch['self_cond'])
    calls = [
        {'noise': batch['noise']},  # training
        {'noise': batch['noise'], 'expected_embedding': True},  # self-conditioning's pass
        {'x_t': batch['noise'] * 5.0, 'expected_embedding': True},  # sampling
    ]
    for kwargs in calls:
        explained = torch._dynamo.explain(denoiser)(*args, **kwargs)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


# -- the step's kernels: each matches the formula it replaced, in fp32 and in bf16 ---------------
def _interleaved_rotary(x: torch.Tensor) -> torch.Tensor:
    """The RoFormer layout the rotate-half one replaced: pairs (2i, 2i+1) through strided slices."""
    from cdcd_composer.model import rotary_tables

    cos, sin = rotary_tables(x.shape[-2], x.shape[-1], x.device, x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def test_rotate_half_rotary_is_the_interleaved_one_up_to_a_channel_permutation():
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64, requires_grad=True)
    halves = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))  # (2i, 2i+1) -> (i, i + 4)
    torch.testing.assert_close(rotary(x[..., halves]), _interleaved_rotary(x)[..., halves])
    # Its backward is the inverse rotation, and a rotation keeps norms.
    torch.autograd.gradcheck(lambda v: rotary(v), (x,))
    torch.testing.assert_close(rotary(x).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_cross_entropy_matches_torchs_in_value_and_gradient(dtype, tolerance, monkeypatch):
    """Several chunks, padded columns at -inf: the loss and the gradient of F.cross_entropy on fp32."""
    from cdcd_composer import model as model_module

    monkeypatch.setattr(model_module, 'CE_CHUNK_LOGITS', 64 * 7)  # 7 rows per chunk: 3 chunks
    logits = (torch.randn(20, 64) * 3).to(dtype)
    logits[:, 50:] = float('-inf')
    logits.requires_grad_(True)
    targets = torch.randint(0, 50, (20,))
    weights = torch.rand(20)
    ce = vocabulary_cross_entropy(logits, targets)
    assert ce.dtype == torch.float32
    (ce * weights).sum().backward()
    reference = logits.detach().float()[:, :50].requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(reference, targets, reduction='none')
    (expected * weights).sum().backward()
    torch.testing.assert_close(ce, expected, rtol=tolerance, atol=tolerance)
    assert logits.grad.dtype == dtype and (logits.grad[:, 50:] == 0).all()
    torch.testing.assert_close(logits.grad[:, :50].float(), reference.grad, rtol=tolerance, atol=tolerance)


def test_layer_norm_runs_in_the_autocast_dtype_and_matches_fp32():
    from cdcd_composer.model import AdaptiveLayerNorm

    norm = AdaptiveLayerNorm(32, 8)
    torch.nn.init.normal_(norm.modulation.weight, std=0.1)
    x, time = torch.randn(2, 5, 32) * 4 + 1, torch.randn(2, 8)
    reference = norm(x, time)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = norm(x, time)
    assert reference.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=2e-2, atol=3e-2)


def test_the_padded_vocabulary_is_never_predicted_and_old_weights_load(wrapper):
    """The head is 64-aligned (50 -> 64), the input 16-aligned (3 * 8 + 1 = 25 -> 32): outputs stay
    vocabulary-sized, the padded logits are -inf, and a state saved unpadded loads with zeros."""
    model = wrapper.model
    assert model.head.out_features == 64 and model.input_projection.in_features % 16 == 0
    with torch.no_grad():
        model.head.bias[VOCAB:] = 1e4  # even a padded logit the head would favour is never chosen
    batch = wrapper.corrupt(_batch())
    out = wrapper.denoise(batch, expected_embedding=True, cross_entropy=True)
    assert out.logits.shape[-1] == VOCAB and out.logits.argmax(-1).max() < VOCAB
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.cross_entropy).all()
    assert out.x0_hat.dtype == torch.float32
    unpadded = {k: v.clone() for k, v in model.state_dict().items()}
    unpadded['head.weight'] = unpadded['head.weight'][:VOCAB]
    unpadded['head.bias'] = unpadded['head.bias'][:VOCAB]
    unpadded['input_projection.weight'] = unpadded['input_projection.weight'][:, : model.input_width]
    fresh = CDCDTransformer(model.config)
    fresh.load_state_dict(unpadded)
    assert (fresh.head.weight[VOCAB:] == 0).all() and (
        fresh.input_projection.weight[:, model.input_width :] == 0
    ).all()
    args = (batch['tokens'], batch['t'], batch['generate_mask'], batch['self_cond'])
    again, before = fresh(*args, noise=batch['noise']), model(*args, noise=batch['noise'])
    torch.testing.assert_close(again.logits, before.logits)


def test_x0_hat_is_float32_under_autocast(wrapper):
    batch = wrapper.corrupt(_batch())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = wrapper.denoise(batch, expected_embedding=True)
    assert out.logits.dtype == torch.bfloat16 and out.x0_hat.dtype == torch.float32
