"""Exact resume: a run interrupted mid-epoch and resumed ends bit-for-bit where an uninterrupted
run ends (per-batch losses after the resume point, weights, optimizer state, time-warp curve)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.core import Callback

import train
from cdcd_composer.callbacks import TimeWarpRefit

pytestmark = pytest.mark.slow

MASKING = {'prefix': 0.5, 'random': 0.3, 'span': 0.2, 'drop': 0.1}
REFIT = {'interval': '2ba', 'buffer_size': 64, 'n_bins': 8, 'min_points': 16, 'min_explained': 0.0}


class Preempted(Exception):
    pass


class Recorder(Callback):
    """Per-batch training loss; optionally dies when batch `crash_at` starts."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.crash_at = crash_at

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.crash_at:
            raise Preempted

    def batch_end(self, state, logger) -> None:
        self.losses[int(state.timestamp.batch)] = state.loss.detach().clone()


def resumable_config(tiny_config: dict, folder: Path, name: str) -> dict:
    """cdcd-tiny with masks, self-conditioning, refits, an eval and checkpoints every 4 batches."""
    cfg = dict(
        tiny_config, run_name=name, autoresume=True, save_folder=str(folder / 'ckpt'), save_interval='4ba',
        save_num_checkpoints_to_keep=-1, max_duration='10ba', eval_interval='5ba', masking=MASKING,
    )  # fmt: skip
    cfg['callbacks'] = dict(cfg['callbacks'], time_warp_refit=dict(REFIT, plot_folder=str(folder)))
    cfg['callbacks']['export_weights'] = {'folder': str(folder / 'export')}
    return cfg


def fit(cfg: dict, recorder: Recorder):
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    return trainer


def test_interrupted_mid_epoch_run_resumes_bit_for_bit(tiny_config, tmp_path):
    straight = Recorder()
    a = fit(resumable_config(tiny_config, tmp_path / 'a', 'straight'), straight)

    cfg = resumable_config(tiny_config, tmp_path / 'b', 'interrupted')
    with pytest.raises(Preempted):
        fit(cfg, Recorder(crash_at=6))  # Batches 5 and 6 are lost; the checkpoint at 4 survives.
    resumed = Recorder()
    b = fit(cfg, resumed)  # The same config again: autoresume picks up batch 4 (mid-epoch: 32/epoch).

    assert sorted(resumed.losses) == list(range(5, 11))
    for batch, loss in resumed.losses.items():
        assert torch.equal(loss, straight.losses[batch]), batch
    weights_a, weights_b = a.state.model.state_dict(), b.state.model.state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    opt_a, opt_b = a.state.optimizers[0].state_dict()['state'], b.state.optimizers[0].state_dict()['state']
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    warp_a, warp_b = (next(c for c in t.state.callbacks if isinstance(c, TimeWarpRefit)) for t in (a, b))
    assert warp_a.fit_count == warp_b.fit_count > 0
    for key, value in warp_a.warp.state_dict().items():
        assert torch.equal(value, warp_b.warp.state_dict()[key]), key
