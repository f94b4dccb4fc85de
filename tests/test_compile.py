"""A shipped GPU recipe with compile on, through a real run's call mix, under dynamo's recompile limit.

The call mix: the training pass, self-conditioning's fused no-grad pass over the chosen examples
(a batch size of its own), evaluation's CE at each noise level, the NLL bound's two passes, and
the training-samples callback's sampler (prompted and not, at another batch size).
"""

import logging

import pytest
import torch
from conftest import REPO
from shipped import shrunk_overrides

from cdcd_composer.commands import train
from cdcd_composer.config import load_config

pytestmark = pytest.mark.slow


def test_a_compiled_recipe_runs_evaluations_and_samples_without_reaching_the_recompile_limit(
    tiny_dataset, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)  # the YAML's relative runs/ paths land here
    overrides = [
        *shrunk_overrides('cdcd-140m', tiny_dataset), 'compile_config={}', 'progress_bar=false',
        'callbacks.training_samples.interval=2ba', 'save_folder=null', 'data.num_workers=0',
    ]  # fmt: skip
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, 'fail_on_recompile_limit_hit', True)  # raise, not fall back
    frames = torch._dynamo.utils.counters['stats']
    with caplog.at_level(logging.WARNING):
        trainer = train.main(
            load_config(str(REPO / 'yamls' / 'cdcd-140m.yaml'), overrides), return_trainer=True
        )
    assert int(trainer.state.timestamp.batch) == 6
    evaluations = [r for r in caplog.records if 'sample at batch' in r.getMessage()]
    assert len(evaluations) >= 4  # two rounds of training samples, prompted and unprompted
    limit = [r.getMessage() for r in caplog.records if 'recompile_limit' in r.getMessage()
             or 'cache_size_limit' in r.getMessage()]  # fmt: skip
    assert not limit, limit
    # Every kind of call compiled once, whatever its batch size: well under the limit of 8.
    assert 0 < frames['unique_graphs'] <= torch._dynamo.config.recompile_limit, dict(frames)
