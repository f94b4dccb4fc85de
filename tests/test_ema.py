"""EMA: the averages follow their closed form, are held shard for shard under FSDP2, are what
evaluation and the export use, and are refused or chosen by name."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import REPO, launch_two_ranks, tiny_overrides
from torch import nn

from cdcd_composer.algorithms import EMA
from cdcd_composer.averaged_weights import AveragedWeights
from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.commands import train
from cdcd_composer.commands.export import main as export_main
from cdcd_composer.config import load_config


def test_averages_follow_the_closed_form_and_swap_in_place():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    averages = AveragedWeights(model)
    assert set(averages.averages) == {'0.weight', '0.bias', '1.weight'}
    ema = EMA(half_life='2ba')
    assert ema.smoothing == pytest.approx(2**-0.5)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    averages.update(ema.smoothing)
    for name, average in averages.averages.items():
        expected = ema.smoothing * start[name] + (1 - ema.smoothing) * (start[name] + 1.0)
        assert torch.allclose(average, expected, atol=1e-6), name
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged = {n: a.clone() for n, a in averages.averages.items()}
    storage = {n: p.data_ptr() for n, p in params.items()}
    with averages.swapped_in():
        for name, average in averages.averages.items():
            assert torch.equal(params[name], averaged[name]) and torch.equal(average, trained[name])
        assert torch.equal(params['1.bias'], trained['1.bias'])
        with pytest.raises(RuntimeError, match='swapped in'):
            averages.update(ema.smoothing)
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert all(p.data_ptr() == storage[n] for n, p in params.items())  # in place: FSDP2's storage stays


@pytest.mark.parametrize('half_life', ['0ba', '2ep', 'soon', '-3ba'])
def test_a_half_life_that_is_not_a_positive_number_of_batches_is_named(half_life):
    with pytest.raises(ValueError, match=r'algorithms.ema.half_life=.* must be a positive number of batches'):
        EMA(half_life=half_life)


@pytest.mark.slow
def test_evaluation_and_export_use_the_averages_and_the_spec_says_so(tiny_dataset, tmp_path, capsys):
    overrides = [*tiny_overrides(tiny_dataset, tmp_path), 'algorithms.ema.half_life=2ba', 'eval_interval=4ba']
    trainer = train.main(load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), overrides), return_trainer=True)
    model = trainer.state.model
    logged = float(trainer.state.eval_metrics['eval']['CE_t1'].compute())
    batch = next(iter(trainer.state.evaluators[0].dataloader.dataloader))

    def ce_t1() -> float:
        with torch.no_grad():
            return float(model.eval().eval_forward(batch)['CE_t1'].double().mean())

    raw = ce_t1()
    with model.ema.swapped_in():
        averaged = ce_t1()
    assert averaged == pytest.approx(logged, rel=1e-6) and raw != pytest.approx(logged, rel=1e-6)

    export = load_trained_model(str(tmp_path / 'export'))
    assert export.spec.weights == 'ema'
    averages = model.ema.averages
    assert all(torch.equal(export.state_dict()[name], average) for name, average in averages.items())
    checkpoint = str(tmp_path / 'checkpoints' / 'latest-rank0.pt')
    assert load_trained_model(checkpoint, weights='raw').spec.weights == 'raw'
    raw_model = load_trained_model(checkpoint, weights='raw')
    assert all(torch.equal(raw_model.state_dict()[n], p) for n, p in model.named_parameters())
    # An export holds one set: asking it for the raw weights is refused in one line.
    with pytest.raises(ValueError, match='holds only the EMA weights; export the training checkpoint again'):
        load_trained_model(str(tmp_path / 'export'), weights='raw')
    assert export_main([checkpoint, str(tmp_path / 'raw'), '--weights', 'raw']) == 0
    assert 'raw weights' in capsys.readouterr().out
    config = json.loads((tmp_path / 'raw' / 'cdcd_config.json').read_text())
    assert json.loads(config['spec'])['weights'] == 'raw'


def test_a_run_without_ema_exports_its_raw_weights_under_either_choice(tiny_dataset, tmp_path):
    from cdcd_composer.composer_model import CDCDComposerModel
    from cdcd_composer.export import select_weights

    model = CDCDComposerModel({'vocab_size': 11, 'd_embed': 4, 'd_model': 8, 'n_layers': 1, 'n_heads': 2})
    state = model.state_dict()
    for weights in ('ema', 'raw'):
        chosen = select_weights(state, weights, 'the run')
        assert json.loads(chosen['_extra_state'])['weights'] == 'raw'
    with pytest.raises(ValueError, match="weights='best' is not one of ema, raw"):
        select_weights(state, 'best', 'the run')


FSDP2_LAYOUT = """
import json, sys
import torch
from torch.distributed.tensor import DTensor
from cdcd_composer.commands import train
from cdcd_composer.config import load_config
from composer.utils import dist

trainer = train.main(load_config({yaml!r}, {overrides!r}), return_trainer=True, do_train=False)
model = trainer.state.model
averages = model.ema
layout = all(
    isinstance(p, DTensor) and isinstance(averages.averages[n], DTensor)
    and averages.averages[n].placements == p.placements and averages.averages[n].device_mesh == p.device_mesh
    and averages.averages[n].to_local().shape == p.to_local().shape
    for n, p in averages.params.items()
)
trainer.fit()
full = {{n: a.full_tensor() for n, a in averages.averages.items()}}
if dist.get_global_rank() == 0:
    torch.save(full, {out!r})
    json.dump({{'layout': layout, 'count': len(full)}}, open({out!r} + '.json', 'w'))
"""


@pytest.mark.slow
def test_under_fsdp2_the_averages_are_dtensors_placed_like_their_parameters(tiny_dataset, tmp_path):
    overrides = [
        *tiny_overrides(tiny_dataset, tmp_path), 'algorithms.ema.half_life=2ba',
        'parallelism_config.fsdp.state_dict_type=sharded',
    ]  # fmt: skip
    script, out = tmp_path / 'layout.py', tmp_path / 'averages.pt'
    yaml = str(REPO / 'yamls' / 'cdcd-tiny.yaml')
    code = FSDP2_LAYOUT.format(repo=str(REPO), yaml=yaml, overrides=overrides, out=str(out))
    script.write_text(textwrap.dedent(code))
    launch_two_ranks(script, [], tmp_path)
    report = json.loads((tmp_path / 'averages.pt.json').read_text())
    assert report['layout'] and report['count'] > 0
    averages = torch.load(out)
    export = load_trained_model(str(tmp_path / 'export'))
    assert export.spec.weights == 'ema'
    assert all(torch.equal(export.state_dict()[name], full) for name, full in averages.items())


def test_a_half_life_long_against_the_run_is_one_warning_line(tiny_config, caplog):
    """An EMA whose half-life is half the run keeps 25% of the initial weights: said before training."""
    from cdcd_composer.commands.train import check_averaging_horizon
    from cdcd_composer.config import parse_config

    cfg = parse_config({**tiny_config, 'algorithms': {'ema': {'half_life': '2ba'}}, 'max_duration': '4ba'})
    with caplog.at_level('WARNING', logger='train'):
        check_averaging_horizon(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and 'keep 25% of the initial ones' in lines[0]
    caplog.clear()
    check_averaging_horizon(
        parse_config({**tiny_config, 'algorithms': {'ema': {'half_life': '2ba'}}, 'max_duration': '100ba'})
    )
    assert not caplog.records  # 2^-50 of the initial weights: nothing to say
