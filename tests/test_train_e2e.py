import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.commands import generate, train
from cdcd_composer.data.grammar import recognised_fraction
from cdcd_composer.sampler import DEFAULT_SOLVER, decode_samples, sample

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tiny_config, tmp_path):
    trainer = train.main(tiny_config, return_trainer=True)
    checkpoint = tmp_path / 'checkpoints' / 'latest-rank0.pt'
    assert checkpoint.exists()
    return trainer, checkpoint


def test_trains_saves_reloads_and_compares_weights(trained, tiny_config):
    trainer, checkpoint = trained
    state = trainer.state
    assert int(state.timestamp.batch) == 4
    assert torch.isfinite(state.loss).all()
    metrics = state.eval_metrics['eval']
    assert set(metrics) >= {'CE_t1', 'CE_t20', 'Accuracy_t1', 'NLL_bound'}
    assert all(torch.isfinite(m.compute()) for m in metrics.values())
    trained_weights = {k: v.detach().clone() for k, v in state.model.model.state_dict().items()}

    # Reload 1: the weights-only path used by generate.py.
    loaded = load_trained_model(str(checkpoint))
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, trained_weights[name]), name
    assert loaded.spec.data.seq_len == 96 and loaded.spec.data.source == 'synthetic'

    # Reload 2: Composer's own load into a freshly built trainer (a different init seed).
    cfg = dict(tiny_config, load_path=str(checkpoint), seed=123, save_folder=None)
    fresh = train.main(cfg, return_trainer=True, do_train=False)
    for name, value in fresh.state.model.model.state_dict().items():
        assert torch.equal(value, trained_weights[name]), name
    assert int(fresh.state.timestamp.batch) == 4


def test_samples_decode_and_generate_cli(trained, tmp_path, capsys):
    _, checkpoint = trained
    loaded = load_trained_model(str(checkpoint))
    steps = loaded.time_warp.sampling_timesteps(5)
    assert steps[0] == loaded.time_warp.t_max and steps[-1] == loaded.time_warp.t_min
    assert (steps[1:] < steps[:-1]).all()
    a = sample(loaded.model, steps, 3, 96, generator=torch.Generator().manual_seed(1))
    b = sample(loaded.model, steps, 3, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 96)
    assert int(a.max()) < len(loaded.spec.text_tokenizer)
    tokenizer, eos = loaded.spec.text_tokenizer, loaded.spec.data.eos_id
    texts = decode_samples(a, tokenizer, eos)
    assert len(texts) == 3
    assert not any(special in text for text in texts for special in tokenizer.all_special_tokens)
    ended = a[:1].clone()
    ended[0, 6] = eos  # everything from the first end-of-story token on is dropped
    expected = tokenizer.decode(ended[0, :6].tolist(), skip_special_tokens=True).strip()
    assert decode_samples(ended, tokenizer, eos) == [expected]

    out = tmp_path / 'samples.jsonl'
    generate.main([str(checkpoint), '--num_samples', '2', '--steps', '3', '--out', str(out)])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['index'] for r in rows] == [0, 1] and all(
        f'[{r["index"]}] {r["text"]}' in printed for r in rows
    )
    assert f'4 per sample ({DEFAULT_SOLVER}, 3 steps)' in printed  # evaluated at t: nothing to say
    assert {(r['solver'], r['eval_time']) for r in rows} == {(DEFAULT_SOLVER, '1')}
    generate.main([str(checkpoint), '--num_samples', '1', '--steps', '3', '--eval_time', '1.15'])
    assert f'4 per sample ({DEFAULT_SOLVER}, 3 steps, model evaluated at 1.15 t)' in capsys.readouterr().out
    # The share it prints is the grammar's verdict on the very samples it wrote.
    assert f'recognised sentences: {recognised_fraction([r["text"] for r in rows]):.1%}' in printed


def test_given_tokens_stay_clean_while_sampling(trained):
    _, checkpoint = trained
    loaded = load_trained_model(str(checkpoint))
    given = torch.randint(0, len(loaded.spec.text_tokenizer), (2, 96))
    mask = torch.ones(2, 96, dtype=torch.bool)
    mask[:, :10] = False
    out = sample(
        loaded.model,
        loaded.time_warp.sampling_timesteps(3),
        2,
        96,
        given_tokens=given,
        generate_mask=mask,
    )
    assert torch.equal(out[:, :10], given[:, :10])


def test_generate_cli_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert generate.main([str(tmp_path / 'nope.pt')]) == 2
    assert 'not found' in capsys.readouterr().err


def test_composer_launcher_runs_the_tiny_yaml(tiny_dataset, tmp_path):
    launcher = Path(sys.executable).parent / 'composer'
    launcher = str(launcher) if launcher.exists() else shutil.which('composer')
    cmd = [launcher, str(REPO / 'train.py'), str(REPO / 'yamls' / 'cdcd-tiny.yaml')]
    cmd += tiny_overrides(tiny_dataset, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'checkpoints' / 'latest-rank0.pt').exists()
