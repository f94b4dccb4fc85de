"""Distillation: the jump targets, the rows a batch becomes, the student's start and its samples.

The recipe's whole life (1 and 2 ranks, SIGKILL, resume, export, generate.py, eval.py) runs in
the shipped-recipe matrix (tests/test_shipped_recipes.py) on the teacher `tiny_teacher` trains.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO
from shipped import shrunk_overrides

from cdcd_composer import sample_draws
from cdcd_composer.algorithms.distillation import Distillation, jump_target, jumps, pass_indices
from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.commands import generate, train
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.config import load_config
from cdcd_composer.data.loaders import HOST_INDEX
from cdcd_composer.masking import MaskingConfig
from cdcd_composer.sampler import DISTILLED, SamplerSettings, network_evaluations, sample


def test_a_students_passes_are_spaced_along_the_teachers_steps():
    assert pass_indices(24, 1) == [0, 24]
    assert pass_indices(24, 4) == [0, 6, 12, 18, 24]
    assert jumps(24, [1, 2]) == [(0, 12), (0, 24), (12, 24)]
    assert pass_indices(24, 4, 1.5) == [0, 8, 16, 21, 24]  # the later passes closer together
    assert pass_indices(24, 4, 2.5) == [0, 12, 20, 23, 24]
    # Where rounding would start two passes at one step or the last at the end (t_min to t_min),
    # the later passes take the steps just before the end, one each.
    assert pass_indices(24, 8, 2.5) == [0, 7, 12, 17, 20, 21, 22, 23, 24]
    assert pass_indices(8, 8, 3.0) == list(range(9))
    assert network_evaluations(SamplerSettings(solver=DISTILLED), 4) == 4  # the last pass is the argmax


@pytest.mark.parametrize('tau', [1.0, 0.7])
def test_the_jump_target_lands_the_samplers_step_on_the_teachers_state(tau):
    x_t, x_s = torch.randn(3, 5, 4) * 9, torch.randn(3, 5, 4) * 4
    t, s = torch.tensor([9.0, 9.0, 20.0]), torch.tensor([4.0, 1.0, 19.0])
    x0_hat = jump_target(x_t, x_s, t, s, tau)
    landed = x0_hat + ((s / t) ** (1 / tau))[:, None, None] * (x_t - x0_hat)  # sampler._distilled's step
    torch.testing.assert_close(landed, x_s, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # tiny_teacher trains
def test_a_student_starts_as_its_teacher_and_must_be_its_architecture(tiny_teacher):
    teacher = load_trained_model(str(tiny_teacher))
    config = dataclasses.replace(teacher.config, target_time=True)
    student = CDCDComposerModel.from_spec(dataclasses.replace(teacher.spec, model=config))
    distillation = Distillation(str(tiny_teacher), evaluations=[1, 2], default_evaluations=2)
    distillation.init_student(student)
    tokens = torch.randint(5, config.vocab_size, (2, 8))
    args = (
        tokens,
        torch.tensor([3.0, 1.5]),
        torch.ones_like(tokens, dtype=torch.bool),
        torch.zeros(2, 8, 16),
    )
    noise = torch.randn(2, 8, config.d_embed)
    before = teacher.model(*args, noise=noise).logits
    after = student.model.eval()(*args, noise=noise, t_next=torch.tensor([1.0, 1.2])).logits
    torch.testing.assert_close(after, before)  # the landing time enters through a zero layer
    assert student.spec.sampling['solver'] == DISTILLED and set(student.spec.sampling['timesteps']) == {
        '1',
        '2',
    }

    wider = CDCDComposerModel.from_spec(
        dataclasses.replace(teacher.spec, model=dataclasses.replace(config, d_model=2 * config.d_model))
    )
    with pytest.raises(ValueError, match=f'model.d_model={config.d_model}'):
        distillation.init_student(wider)
    with pytest.raises(ValueError, match='model.target_time=true'):
        distillation.init_student(CDCDComposerModel.from_spec(teacher.spec))


@pytest.mark.slow  # tiny_teacher trains
def test_a_samples_rows_do_not_depend_on_the_batch_it_came_in(tiny_teacher):
    """Each row is a function of (seed, epoch, its sample): a batch and its halves make the same rows."""
    teacher = load_trained_model(str(tiny_teacher))
    student = CDCDComposerModel.from_spec(
        dataclasses.replace(teacher.spec, model=dataclasses.replace(teacher.config, target_time=True))
    )
    distillation = Distillation(str(tiny_teacher), evaluations=[1, 2, 4], states_per_trajectory=3)
    distillation.init_student(student)
    tokens = torch.randint(5, teacher.config.vocab_size, (4, teacher.spec.data.seq_len))
    index = torch.tensor([7, 3, 11, 0])

    def rows(pick: slice) -> dict:
        batch = {'tokens': tokens[pick], 'index': index[pick], HOST_INDEX: index[pick].tolist()}
        return distillation.rows(student, batch, sample_draws.SampleDraws(17, 0, index[pick]))

    whole, halves = rows(slice(None)), [rows(slice(0, 2)), rows(slice(2, 4))]
    for key, value in whole.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, torch.cat([h[key] for h in halves]), rtol=1e-4, atol=1e-4)
    assert whole[HOST_INDEX][:3] == [21, 22, 23]  # sample 7's three rows
    # A row that starts at the teacher's first state starts from the sample's own noise at t_max.
    first = whole['t'] == teacher.spec.t_max
    noise = sample_draws.SampleDraws(17, 0, index).normal(sample_draws.TRAJECTORY, tokens.shape[1] * 16)
    expected = (noise.view(4, tokens.shape[1], 16) * teacher.spec.t_max).repeat_interleave(3, 0)
    torch.testing.assert_close(whole['x_t'][first], expected[first])
    # The targets are the teacher's own samples from that noise.
    times = distillation.teacher_times().float()
    settings = SamplerSettings(tau=distillation.tau, self_conditioning=teacher.spec.self_conditioned)
    ends = sample(
        teacher.model, times, 4, tokens.shape[1], settings, noise=noise.view(4, tokens.shape[1], 16)
    )
    assert torch.equal(whole['tokens'], ends.repeat_interleave(3, 0))

    # With conditioning masks the teacher samples around the sample's given tokens, which stay.
    student.masking = MaskingConfig(prefix=1.0, random=0.0, drop=0.0)
    stories = tokens.clone()
    stories[:, tokens.shape[1] // 2 :] = teacher.spec.data.pad_id  # prefixes need story tokens
    batch = {'tokens': stories, 'index': index, HOST_INDEX: index.tolist()}
    masked = distillation.rows(student, batch, sample_draws.SampleDraws(17, 0, index))
    given = ~masked['generate_mask']
    assert given.any() and torch.equal(masked['tokens'][given], stories.repeat_interleave(3, 0)[given])


@pytest.fixture(scope='module')
def student(tmp_path_factory, tiny_dataset, tiny_teacher) -> Path:
    """yamls/cdcd-tiny-distill.yaml shrunk, distilled from `tiny_teacher`: its export."""
    out = tmp_path_factory.mktemp('student')
    overrides = [*shrunk_overrides('cdcd-tiny-distill', tiny_dataset), f'variables.teacher={tiny_teacher}']
    cwd = os.getcwd()
    os.chdir(out)  # the YAML's relative runs/ paths
    try:
        train.main(
            load_config(str(REPO / 'yamls' / 'cdcd-tiny-distill.yaml'), [*overrides, 'progress_bar=false'])
        )
    finally:
        os.chdir(cwd)
    return out / 'runs' / 'cdcd-tiny-distill' / 'export'


@pytest.mark.slow
def test_the_students_export_samples_at_its_recorded_steps(student, tmp_path, capsys):
    assert generate.main([str(student), '--num_samples', '2']) == 0
    assert 'network evaluations: 4 per sample (distilled, 4 steps)' in capsys.readouterr().out
    assert generate.main([str(student), '--num_samples', '2', '--steps', '1', '--prompt', 'once upon']) == 0
    assert 'network evaluations: 1 per sample (distilled' in capsys.readouterr().out
    assert generate.main([str(student), '--steps', '3']) == 2
    assert 'distilled for 1, 2, 4, 8 network evaluations' in capsys.readouterr().err
    assert generate.main([str(student), '--solver', 'dpmpp_2m']) == 2  # an ODE solver needs a teacher
    capsys.readouterr()
    guided = [
        '--num_samples',
        '2',
        '--guidance',
        '2',
        '--template',
        'lily was ___ . the end .',
        '--blank_length',
        '4',
    ]
    assert generate.main([str(student), *guided]) == 0  # guidance and infilling: 2 passes each
    assert 'network evaluations: 8 per sample (distilled, 4 steps)' in capsys.readouterr().out
    # The Hugging Face folder samples it the same way by default.
    from cdcd_composer.commands.export import main as export_main
    from cdcd_composer.hf.modeling_cdcd import CDCDModel

    assert export_main([str(student), str(tmp_path / 'hf'), '--format', 'hf']) == 0
    hf = CDCDModel.from_pretrained(str(tmp_path / 'hf'))
    model = load_trained_model(str(student))
    assert torch.equal(hf.generate(2, seed=3).ids, model.generate_tokens(2, seed=3))
    assert model.spec.default_steps == 4 and model.sampling_settings().solver == DISTILLED


@pytest.mark.slow
def test_the_handover_table_starts_the_student_on_the_teachers_states(student, tiny_teacher, capsys):
    """`bench/sample.py --handover`: a row per pass of each count, from the teacher's step it starts at."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location('bench_sample', REPO / 'bench' / 'sample.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(evaluations=[1, 2, 4], seeds=[0], samples=2)
    bench.handover_table(str(student), str(tiny_teacher), args)
    rows = [
        line.split(' | ')
        for line in capsys.readouterr().out.splitlines()
        if line[:3] in ('| 1', '| 2', '| 4')
    ]
    starts = [(int(r[0][2:]), int(r[1]), int(r[2])) for r in rows]
    recipe = load_config(str(REPO / 'yamls' / 'cdcd-tiny-distill.yaml'), [])
    spacing = recipe['algorithms']['distillation']['spacing']
    expected = [
        (c, k + 1, step) for c in (1, 2, 4) for k, step in enumerate(pass_indices(24, c, spacing)[:-1])
    ]
    assert starts == expected
    for row in rows:
        assert all(0.0 <= float(cell.strip(' |%')) <= 100.0 for cell in row[4:])


@pytest.mark.parametrize('setting, message', [
    ({'states_per_trajectory': 0}, 'states_per_trajectory=0 must be a positive integer'),
    ({'teacher_steps': 'x'}, "teacher_steps='x' must be a positive integer"),
    ({'evaluations': [0]}, r'evaluations=\[0\] must list counts in \[1, teacher_steps=24\]'),
    ({'default_evaluations': 3}, r'default_evaluations=3 must be one of evaluations \[1, 2, 4, 8\]'),
    ({'spacing': float('nan')}, 'spacing=nan must be a positive finite number'),
])  # fmt: skip
def test_a_distillation_setting_out_of_range_is_one_line_naming_it(setting, message):
    with pytest.raises(ValueError, match=message):
        Distillation('runs/teacher/export', **setting)
