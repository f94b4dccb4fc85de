import json
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from cdcd_composer.callbacks.time_warp_refit import TimeWarpRefit
from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.commands import train

pytestmark = pytest.mark.slow

# Small enough to fit after two batches of 8 sequences; min_evidence=0 installs every fit, so
# the curves below are non-trivial (and so are their differences, if any).
REFIT = {
    'interval': '2ba', 'buffer_size': 64, 'n_bins': 8, 'min_points': 16, 'min_evidence': 0.0,
    'min_group_points': 1, 'mu': 0.05,
}  # fmt: skip


def refit_config(tiny_config: dict, tmp_path: Path, **overrides) -> dict:
    cfg = dict(tiny_config, **overrides)
    cfg['callbacks'] = dict(cfg['callbacks'], time_warp_refit=dict(REFIT, plot_folder=str(tmp_path / 'run')))
    return cfg


class Preempted(Exception):
    pass


class CrashAt(Callback):
    """Dies at the start of the batch after `batch` (its checkpoint is already written)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            raise Preempted


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality; empty buffer slots are NaN on both sides."""
    return a.shape == b.shape and torch.equal(a.nan_to_num(nan=-7.0), b.nan_to_num(nan=-7.0))


def refit_callback(trainer) -> TimeWarpRefit:
    return next(c for c in trainer.state.callbacks if isinstance(c, TimeWarpRefit))


def test_refits_install_the_curve_plot_it_and_checkpoint_it(tiny_config, tmp_path):
    trainer = train.main(refit_config(tiny_config, tmp_path, max_duration='6ba'), return_trainer=True)
    callback = refit_callback(trainer)
    assert callback.fit_count >= 1 and callback.fit_count + callback.rejected_count == 3  # at 2, 4, 6
    assert callback.n_seen == 6 * 8
    assert trainer.state.model.time_warp is callback.warp
    assert not torch.equal(callback.warp.masses, torch.full((8,), 1 / 8, dtype=torch.float64))
    assert (tmp_path / 'run' / 'time_warp.png').stat().st_size > 1000
    # State has fixed shapes whatever the fill level (sharded checkpoints need that).
    state = callback.state_dict()
    assert state['buffer'].shape == (4, 64) and trainer.state.model.state_dict()[
        'time_warp.masses'
    ].shape == (8,)
    # generate.py samples with the checkpoint's curve, or uniform on request.
    loaded = load_trained_model(str(tmp_path / 'checkpoints' / 'latest-rank0.pt'))
    assert torch.equal(loaded.time_warp.masses, callback.warp.masses)
    steps = loaded.time_warp.sampling_timesteps(10)
    torch.testing.assert_close(steps, callback.warp.sampling_timesteps(10))
    uniform = load_trained_model(str(tmp_path / 'checkpoints' / 'latest-rank0.pt'), warp=False)
    assert torch.equal(uniform.time_warp.masses, torch.full((100,), 0.01, dtype=torch.float64))


class CaptureCurve(Callback):
    """Records the curve the model samples from when the first batch starts."""

    def __init__(self) -> None:
        self.curve = None

    def batch_start(self, state, logger) -> None:
        if self.curve is None:
            self.curve = state.model.time_warp.state_dict()


def test_resume_restores_the_curve_bit_for_bit(tiny_config, tmp_path):
    common = {'eval_interval': '16ba', 'save_interval': '20ba', 'max_duration': '24ba'}
    first = train.main(refit_config(tiny_config, tmp_path, save_folder=str(tmp_path / 'ckpt'), **common),
                       return_trainer=True, do_train=False)  # fmt: skip
    first.state.callbacks.append(CrashAt(20))  # dies right after its checkpoint at batch 20
    with pytest.raises(Preempted):
        first.fit()
    saved = refit_callback(first).state_dict()
    saved_curve = first.state.model.time_warp.state_dict()  # the warp lives in the model's state
    assert saved['fit_count'] > 3

    resumed = train.main(
        refit_config(tiny_config, tmp_path, save_folder=None,
                     load_path=str(tmp_path / 'ckpt' / 'latest-rank0.pt'), **common),
        return_trainer=True, do_train=False,
    )  # fmt: skip
    restored = refit_callback(resumed)
    assert same(restored.buffer, saved['buffer'])
    assert (restored.n_seen, restored.fit_count, restored.history) == (
        saved['n_seen'], saved['fit_count'], json.loads(saved['history']))  # fmt: skip
    capture = CaptureCurve()
    resumed.state.callbacks.append(capture)
    resumed.fit()
    # The first batch after the resume samples t from exactly the checkpointed curve ...
    for key, value in saved_curve.items():
        assert torch.equal(capture.curve[key], value), key
    # ... and collection carries on into the restored buffer (refits at 22 and 24 may be rejected).
    assert restored.n_seen == saved['n_seen'] + 4 * 8
    assert restored.fit_count >= saved['fit_count']
    assert resumed.state.model.time_warp is restored.warp


def test_a_checkpointed_buffer_of_another_layout_is_refused_in_one_line():
    callback = TimeWarpRefit(buffer_size=200, n_bins=10)
    state = callback.state_dict()
    before = callback.buffer.clone()
    state['buffer'] = torch.arange(600, dtype=torch.float64).view(3, 200)  # t, CE, F'(t): no share row
    with pytest.raises(ValueError, match=r'buffer has 3 rows, not 4 \(t, per-sequence CE.*start afresh$'):
        callback.load_state_dict(state)
    torch.testing.assert_close(callback.buffer, before, equal_nan=True)  # nothing half-loaded
