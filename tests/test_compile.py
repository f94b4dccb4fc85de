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
    torch._dynamo.utils.counters.clear()
    frames = torch._dynamo.utils.counters['stats']
    fail_on_limit = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # raise, not fall back
    with caplog.at_level(logging.INFO, logger='cdcd_composer'), fail_on_limit:
        cfg = load_config(str(REPO / 'yamls' / 'cdcd-140m.yaml'), overrides)
        trainer = train.main(cfg, return_trainer=True)
    assert int(trainer.state.timestamp.batch) == 6  # a limit hit would have raised before this
    samples = {r.getMessage().split(':')[0] for r in caplog.records if 'sample at batch' in r.getMessage()}
    assert len(samples) >= 4, samples  # at batches 2, 4, 6: prompted and unprompted
    assert any('NLL_bound' in key for key in trainer.state.eval_metric_values), (
        trainer.state.eval_metric_values
    )
    # Every kind of call compiled once, whatever its batch size: well under the limit of 8.
    assert 0 < frames['unique_graphs'] <= torch._dynamo.config.recompile_limit, dict(frames)


def test_each_kind_of_call_compiles_once_whatever_its_batch_size():
    """Three batch sizes of a training call, then of a sampling call: one graph each (unmarked,
    dynamo compiles a static graph first and a dynamic one at the second size). Counting dynamo's
    graphs needs no code generated: the aot_eager backend traces them without Inductor's C++ build
    (the test above compiles a recipe with Inductor)."""
    from conftest import TINY_MODEL

    from cdcd_composer.composer_model import CDCDComposerModel
    from cdcd_composer.model import compile_denoiser

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # not cleared by reset() in every torch
    frames = torch._dynamo.utils.counters['stats']
    model = CDCDComposerModel({'vocab_size': 50, **TINY_MODEL})
    compile_denoiser(model.model, {'backend': 'aot_eager'})
    for size in (3, 5, 7):
        batch = model.corrupt({'tokens': torch.randint(0, 50, (size, 12))})
        model.denoise(batch, cross_entropy=True).cross_entropy.sum().backward()
    assert frames['unique_graphs'] == 1, dict(frames)
    model.eval()
    with torch.no_grad():
        for size in (2, 4, 6):
            x = torch.randn(size, 12, model.config.d_embed)
            model.model(torch.zeros(size, 12, dtype=torch.long), torch.full((size,), 3.0),
                        torch.ones(size, 12, dtype=torch.bool), torch.zeros_like(x), x_t=x,
                        expected_embedding=True)  # fmt: skip
    assert frames['unique_graphs'] == 2, dict(frames)
