import pytest
import torch

from cdcd_composer.commands import train

pytestmark = pytest.mark.slow


def run_one_step(
    tiny_config: dict, p: float, masking: bool = True, per: str = 'example', batches: int = 1, **options
) -> tuple[list[dict], object]:
    """Trains `batches` batches and records every training-mode call of the denoiser.

    `options`: more top-level config (a microbatch size).
    """
    cfg = dict(tiny_config, max_duration=f'{batches}ba', eval_interval='100ba', save_folder=None, **options)
    cfg['algorithms'] = dict(cfg['algorithms'], self_conditioning={'p': p, 'per': per})
    if masking:
        cfg['masking'] = {'prefix': 0.5, 'random': 0.5, 'span': 0.0, 'drop': 0.0}
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    calls = []

    def record(module, args, kwargs):
        if module.training:
            tokens, t, mask, self_cond = args
            calls.append({
                'batch': tokens.shape[0], 'step': int(trainer.state.timestamp.batch),
                'grad_enabled': torch.is_grad_enabled(), 'mask': mask.clone(),
                'self_cond': self_cond.detach().clone(), 'self_cond_grad': self_cond.requires_grad,
                't': t.clone(), 'noise': kwargs['noise'].clone(), 'tokens': tokens.clone(),
            })  # fmt: skip

    handle = trainer.state.model.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.fit()
    handle.remove()
    return calls, trainer


def test_p0_makes_one_forward_with_zero_self_conditioning(tiny_config):
    calls, _ = run_one_step(tiny_config, 0.0)
    assert len(calls) == 1 and calls[0]['grad_enabled']
    assert not calls[0]['self_cond'].any()


def test_p1_makes_a_no_grad_pass_then_feeds_its_estimate(tiny_config):
    calls, trainer = run_one_step(tiny_config, 1.0)
    assert len(calls) == 2
    first, second = calls
    assert not first['grad_enabled'] and second['grad_enabled']  # no gradient through the first pass
    assert not second['self_cond_grad']
    assert first['batch'] == second['batch'] == 8
    # Both passes see exactly the same corruption.
    for key in ('t', 'noise', 'mask', 'tokens'):
        assert torch.equal(first[key], second[key]), key
    generated = second['mask'].bool()
    assert (~generated).any() and generated.any()  # the masking mixture gave both kinds
    norms = second['self_cond'].norm(dim=-1)
    assert (norms[generated] > 0).all()  # an estimate wherever a token is generated
    assert (norms[~generated] == 0).all()  # none where it is given
    # x0_hat is a convex combination of normalised embeddings: its norm is at most sqrt(d).
    assert norms.max() <= 16**0.5 + 1e-4


def test_p_half_per_batch_tosses_one_coin_per_batch(tiny_config):
    calls, trainer = run_one_step(tiny_config, 0.5, per='batch', batches=8)
    by_step = {}
    for call in calls:
        by_step.setdefault(call['step'], []).append(call)
    assert sorted(by_step) == list(range(8))
    heads = []
    for step_calls in by_step.values():
        # Heads: a no-grad pass over the whole microbatch, then the training pass; tails: one pass.
        assert [c['grad_enabled'] for c in step_calls] in ([False, True], [True])
        assert all(c['batch'] == 8 for c in step_calls)
        heads.append(len(step_calls) == 2)
        assert step_calls[-1]['self_cond'].flatten(1).any(-1).all() == heads[-1]
    assert 0 < sum(heads) < 8  # both outcomes occur in 8 tosses at p = 0.5 with this seed
    # The coin depends on the seed and the batch index only: a second run tosses the same coins.
    again, _ = run_one_step(tiny_config, 0.5, per='batch', batches=8)
    assert [c['step'] for c in again] == [c['step'] for c in calls]
    model = trainer.state.model
    assert model.flops_per_batch({'tokens': calls[-1]['tokens']}) == int(
        3.5 * model.forward_flops(8, calls[-1]['tokens'].shape[1])
    )  # expected FLOPs: p extra forwards per example


def test_p_half_per_example_runs_the_extra_pass_on_the_heads(tiny_config):
    calls, trainer = run_one_step(tiny_config, 0.5, per='example', global_train_batch_size=32)
    first, second = calls
    with_estimate = second['self_cond'].flatten(1).any(-1)
    assert second['batch'] == 32 and first['batch'] == int(with_estimate.sum())  # the pass ran on the heads
    assert 8 <= int(with_estimate.sum()) <= 24  # each example's own coin: Binomial(32, 0.5), 4 sd
    # The choice is reproducible from the seed: a second run chooses the same examples.
    again, _ = run_one_step(tiny_config, 0.5, per='example', global_train_batch_size=32)
    assert torch.equal(again[1]['self_cond'].flatten(1).any(-1), with_estimate)
    model = trainer.state.model
    batch = {'tokens': second['tokens']}
    assert model.flops_per_batch(batch) == int(3.5 * model.forward_flops(32, second['tokens'].shape[1]))


def test_one_pass_per_batch_gives_microbatches_the_whole_batchs_signal(tiny_config):
    """One no-grad pass per batch, however it is split: microbatches train on what the whole batch would."""
    split, _ = run_one_step(tiny_config, 0.5, batches=2, device_train_microbatch_size=2)
    whole, _ = run_one_step(tiny_config, 0.5, batches=2)
    assert [c['grad_enabled'] for c in split] == [False, True, True, True, True] * 2  # 2 batches x 4
    assert [c['batch'] for c in split if c['grad_enabled']] == [2] * 8
    assert [c['grad_enabled'] for c in whole] == [False, True] * 2
    for step in (0, 1):
        parts = [c for c in split if c['grad_enabled'] and c['step'] == step]
        (joined,) = [c for c in whole if c['grad_enabled'] and c['step'] == step]
        for key in ('t', 'noise', 'mask', 'tokens'):  # the same corruption ...
            assert torch.equal(torch.cat([c[key] for c in parts]), joined[key]), key
        # ... the same chosen examples, and their estimates (one pass, at the weights of the batch)
        self_cond = torch.cat([c['self_cond'] for c in parts])
        assert torch.equal(self_cond.flatten(1).any(-1), joined['self_cond'].flatten(1).any(-1))
        if step == 0:  # the weights of step 1 differ by float rounding (gradients summed by microbatch)
            torch.testing.assert_close(self_cond, joined['self_cond'], rtol=1e-5, atol=1e-6)


def test_sampler_feeds_the_previous_estimate_back(tiny_config):
    from cdcd_composer.sampler import SamplerSettings, sample

    _, trainer = run_one_step(tiny_config, 1.0, masking=False)
    model = trainer.state.model.model.eval()
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[3].clone()), with_kwargs=True
    )
    timesteps = trainer.state.model.time_warp.sampling_timesteps(3)
    for on in (False, True):
        seen.clear()
        sample(model, timesteps, 2, 96, SamplerSettings(self_conditioning=on), generator=torch.Generator())
        assert len(seen) == 4  # three steps and the final argmax pass
        assert not seen[0].any()  # zero on the first step
        assert all(s.any() for s in seen[1:]) == on
    handle.remove()


def test_the_examples_chosen_depend_only_on_seed_epoch_and_index():
    """Each example's coin is its own: in any batch, microbatch or rank, and after a resume."""
    from types import SimpleNamespace

    from cdcd_composer.algorithms.self_conditioning import SelfConditioning
    from cdcd_composer.data.loaders import HOST_INDEX

    def chosen(index, epoch=0):
        model = SimpleNamespace(noise_seed=(17, epoch))  # as BatchNoiseSeed leaves it
        batch = {'tokens': torch.zeros(len(index), 4, dtype=torch.long), HOST_INDEX: index}
        return [index[i] for i in SelfConditioning(0.5)._choose(model, batch).tolist()]

    whole = chosen(list(range(64)))
    assert 16 <= len(whole) <= 48  # Binomial(64, 0.5), 4 sd
    assert chosen(list(range(32))) + chosen(list(range(32, 64))) == whole  # split in two microbatches
    assert sorted(chosen(list(range(63, -1, -1)))) == whole  # in another order
    assert chosen(list(range(64)), epoch=1) != whole  # the next epoch tosses again
    with pytest.raises(ValueError, match='self_conditioning.p'):
        SelfConditioning(1.5)
    with pytest.raises(ValueError, match='self_conditioning.per'):
        SelfConditioning(0.5, per='rank')


def test_batch_coin_is_a_function_of_seed_and_batch_and_fair():
    """The per-batch coin reads only (seed, batch index): every rank tosses the same."""
    from types import SimpleNamespace

    from cdcd_composer.algorithms import self_conditioning

    def tosses(algorithm):
        state = lambda b: SimpleNamespace(rank_zero_seed=17, timestamp=SimpleNamespace(batch=b))  # noqa: E731
        return [algorithm._batch_heads(state(b)) for b in range(4000)]

    on_one_rank = tosses(self_conditioning.SelfConditioning(0.3, per='batch'))
    assert tosses(self_conditioning.SelfConditioning(0.3, per='batch')) == on_one_rank
    assert abs(sum(on_one_rank) / 4000 - 0.3) < 0.03  # 4 standard errors
