"""The recipe on a CUDA GPU: bf16 training through Composer, then sampling on the device.

Marked `gpu` (and `slow`): skipped where no GPU is, run with `make test-gpu` where one is.
"""

import math

import pytest
import torch

from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.commands import train
from cdcd_composer.sampler import SamplerSettings

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_training_and_sampling_on_the_gpu(tiny_config, tmp_path):
    cfg = dict(tiny_config, device='gpu', precision='amp_bf16')
    trainer = train.main(cfg, return_trainer=True)
    state = trainer.state
    assert int(state.timestamp.batch) == 4 and math.isfinite(float(state.loss))
    assert all(p.device.type == 'cuda' for p in state.model.parameters())
    assert str(state.precision.value) == 'amp_bf16'

    model = load_trained_model(str(tmp_path / 'export'), device='cuda')
    settings = SamplerSettings(self_conditioning=model.spec.self_conditioned)
    first = model.generate_tokens(2, steps=4, settings=settings, seed=3)
    again = model.generate_tokens(2, steps=4, settings=settings, seed=3)
    assert first.device.type == 'cuda' and first.shape == (2, model.spec.data.seq_len)
    assert torch.equal(first, again)  # the same seed, the same samples, on the device too
