"""The training step does no host syncs, the fused optimizer equals Composer's, the loss layout is exact."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from composer.core import Event, Precision
from composer.optim import DecoupledAdamW

from cdcd_composer.algorithms.self_conditioning import SelfConditioning
from cdcd_composer.callbacks.time_warp_refit import TimeWarpRefit
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.model import vocabulary_cross_entropy
from cdcd_composer.optim import FusedDecoupledAdamW

TINY = {
    'vocab_size': 50,
    'd_embed': 8,
    'd_model': 16,
    'n_layers': 2,
    'n_heads': 2,
    'n_fourier': 8,
    'd_time': 8,
}
MASKING = {'prefix': 0.4, 'random': 0.3, 'span': 0.3, 'drop': 0.1}


def test_training_step_runs_on_the_meta_device_so_it_never_syncs_with_the_host():
    """Meta tensors hold no data: `.item()`, `.cpu()`, `.tolist()`, `bool(t)` or boolean indexing
    on them raise. A step that runs on meta therefore never waits for the GPU."""
    model = CDCDComposerModel(TINY, t_max=20.0, masking=MASKING).to('meta')
    refit = TimeWarpRefit(interval='1000ba', buffer_size=64, n_bins=8)
    state = SimpleNamespace(
        model=model, batch={'tokens': torch.randint(0, 50, (4, 12)).to('meta')},
        timestamp=SimpleNamespace(batch=3), rank_zero_seed=1, precision=Precision.FP32,
        precision_config=None, device=SimpleNamespace(tensor_to_device=lambda x: x), outputs=None,
        callbacks=[], run_name='meta', previous_timestamp=None,
    )  # fmt: skip
    refit.init(state, logger=None)  # installs a (uniform) warp: t is drawn through its inverse CDF
    refit.warp.masses = torch.linspace(1.0, 2.0, 8, dtype=torch.float64) / 12.0  # a non-trivial curve
    SelfConditioning(p=0.5).apply(Event.BEFORE_FORWARD, state, logger=None)  # extra no-grad pass
    state.outputs = model(state.batch)
    model.loss(state.outputs, state.batch).backward()
    refit.after_forward(state, logger=None)  # (t, CE, F'(t)) bookkeeping
    refit.batch_end(state, logger=None)  # ring-buffer append (the interval does not trigger a refit)
    assert refit.buffer.device.type == 'meta' and refit.n_seen == 4
    assert model.model.head.weight.grad is not None


def test_fused_optimizer_makes_composers_decoupled_adamw_update():
    torch.manual_seed(0)
    nets = [
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)) for _ in range(2)
    ]
    nets[1].load_state_dict(nets[0].state_dict())

    def groups(net):
        return [
            {'params': [p for p in net.parameters() if p.ndim > 1]},
            {'params': [p for p in net.parameters() if p.ndim < 2], 'weight_decay': 0.0},
        ]

    kwargs = {'lr': 1e-2, 'betas': (0.9, 0.99), 'weight_decay': 1e-3}
    optimizers = [DecoupledAdamW(groups(nets[0]), **kwargs), FusedDecoupledAdamW(groups(nets[1]), **kwargs)]
    x = torch.randn(32, 8)
    for step in range(20):
        for net, optimizer in zip(nets, optimizers):
            for group in optimizer.param_groups:  # a decaying schedule, as Composer's schedulers set it
                group['lr'] = group['initial_lr'] * (1 - step / 25)
            net(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for reference, fused in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)


def test_token_cross_entropy_equals_the_sequence_layout():
    logits, tokens = torch.randn(3, 7, 50), torch.randint(0, 50, (3, 7))
    expected = F.cross_entropy(logits.transpose(1, 2), tokens, reduction='none')
    torch.testing.assert_close(vocabulary_cross_entropy(logits, tokens), expected)
