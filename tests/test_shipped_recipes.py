"""Every shipped YAML lives its life as shipped, shrunk in size only: 1 process, and 2 ranks (GPU recipes).

Each run evaluates, checkpoints, is SIGKILLed once its checkpoint of batch 3 is saved, and the
very same command then resumes and finishes (evaluating twice more). Its export is then read
by `generate.py` and `eval.py`, and `export.py` exports the final checkpoint again, with the
averaged and the raw weights: the export must hold the weights its spec claims.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, kill_when_paused
from safetensors.torch import load_file
from shipped import BATCHES, EVAL_EVERY, SAVE_EVERY, SHIPPED, shipped_yaml, shrunk_overrides

from cdcd_composer.commands import evaluate as eval_cli
from cdcd_composer.commands import generate
from cdcd_composer.commands.export import main as export_main
from cdcd_composer.data.conversion import convert

pytestmark = pytest.mark.slow

DRIVER = REPO / 'tests' / 'loss_recording_driver.py'


@pytest.fixture(scope='session')
def byte_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic stories as bytes (cdcd-char's tokenizer) on a 128-byte canvas."""
    root = tmp_path_factory.mktemp('data') / 'synthetic-char'
    convert(source='synthetic', out_root=str(root), tokenizer='bytes', seq_len=128, num_train=256, num_val=64)
    return root


def run_command(name: str, ranks: int, data_root: Path, tmp_path: Path, teacher: Path) -> list[str]:
    """`composer -n RANKS train.py yamls/NAME.yaml <sizes>` (through the loss-recording driver).

    A distillation recipe distils `teacher`, cdcd-tiny shrunk the same way.
    """
    distils = 'distillation' in (shipped_yaml(name).get('algorithms') or {})
    # One process runs as `python train.py` does (the launcher's one-rank path: test_train_e2e.py).
    launcher = str(Path(sys.executable).parent / 'composer')
    launch = (
        [launcher, '-n', str(ranks), '--stderr', str(tmp_path / 'err{rank}.txt')]
        if ranks > 1
        else [sys.executable]
    )
    yaml_path = str(REPO / 'yamls' / f'{name}.yaml')
    return [
        *launch, str(DRIVER), str(tmp_path / 'batches-{rank}.txt'), yaml_path,
        *shrunk_overrides(name, data_root), *([f'variables.teacher={teacher}'] if distils else []),
    ]  # fmt: skip


def trained_batches(tmp_path: Path, rank: int) -> list[int]:
    return [int(line.split()[0]) for line in (tmp_path / f'batches-{rank}.txt').read_text().splitlines()]


def eval_batches(log: Path) -> list[int]:
    """The batches at which the file logger recorded validation metrics."""
    found = re.findall(r'\[metric\]\[batch=(\d+)\]: metrics/eval/', log.read_text())
    return sorted({int(b) for b in found})


def checkpoint_batches(folder: Path) -> list[int]:
    return sorted(
        int(m.group(1))
        for p in folder.iterdir()
        if (m := re.fullmatch(r'ep\d+-ba(\d+)(-rank0\.pt)?', p.name))
    )


# Every recipe on one process; the multi-GPU recipes on 2 ranks too. cdcd-tiny and cdcd-char are
# single-device recipes whose 2-rank path (DDP, no parallelism block) is cdcd-5m's; the
# distillation runs on 2 ranks too (its rows are built per rank, from each rank's samples).
MATRIX = [(name, 1) for name in SHIPPED] + [('cdcd-5m', 2), ('cdcd-140m', 2), ('cdcd-tiny-distill', 2)]


@pytest.mark.parametrize('name, ranks', MATRIX)
def test_shipped_recipe_evaluates_survives_sigkill_resumes_and_exports(
    name, ranks, tiny_dataset, byte_dataset, tiny_teacher, tmp_path, capsys
):
    shipped = shipped_yaml(name)
    data_root = byte_dataset if name == 'cdcd-char' else tiny_dataset
    cmd = run_command(name, ranks, data_root, tmp_path, tiny_teacher)
    markers = [tmp_path / f'paused-{rank}' for rank in range(ranks)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PAUSE_AT_BATCH=str(SAVE_EVERY))
    env['PAUSE_MARKER'] = str(tmp_path / 'paused-{rank}')
    env.pop('FSDP_VERSION', None)  # train.py's default is what a user runs

    kill_when_paused(cmd, markers, env, cwd=tmp_path)  # once every rank holds after its checkpoint
    run = tmp_path / 'runs' / shipped['variables']['run_name']
    assert checkpoint_batches(run / 'checkpoints') == [SAVE_EVERY]
    assert not (run / 'export').exists()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)  # The same command.
    errors = ''.join(p.read_text()[-3000:] for p in tmp_path.glob('err*.txt'))
    assert proc.returncode == 0, proc.stderr[-2000:] + errors

    for rank in range(ranks):  # Killed after batch 3; resumed from its checkpoint; finished at 6.
        assert trained_batches(tmp_path, rank) == list(range(1, BATCHES + 1)), rank
    assert SAVE_EVERY * 2 == BATCHES and BATCHES in checkpoint_batches(run / 'checkpoints')
    evals = eval_batches(run / 'logs-rank0.txt')
    assert evals == list(range(EVAL_EVERY, BATCHES + 1, EVAL_EVERY)), evals  # 2 of them after the resume

    # The export: the averaged weights where the recipe keeps them, as its spec says.
    ema = bool((shipped.get('algorithms') or {}).get('ema'))
    export = run / 'export'
    config = json.loads((export / 'cdcd_config.json').read_text())
    assert json.loads(config['spec'])['weights'] == ('ema' if ema else 'raw')
    latest = run / 'checkpoints' / 'latest-rank0.pt'
    again = {w: tmp_path / f'export-{w}' for w in ('ema', 'raw')}
    for weights, out in again.items():
        assert export_main([str(latest), str(out), '--weights', weights]) == 0
    tensors = {w: load_file(str(p / 'model.safetensors')) for w, p in {**again, 'run': export}.items()}
    assert tensors['run'].keys() == tensors['raw'].keys()
    assert all(torch.equal(tensors['run'][k], tensors['ema'][k]) for k in tensors['run'])  # What it claims.
    denoiser = [k for k in tensors['raw'] if k.startswith('model.')]
    differ = [k for k in denoiser if not torch.equal(tensors['raw'][k], tensors['ema'][k])]
    assert bool(differ) == ema  # EMA weights are not the raw ones; without EMA both are the raw ones.

    samples = tmp_path / 'samples.jsonl'
    assert generate.main([str(export), '--num_samples', '2', '--steps', '2', '--out', str(samples)]) == 0
    assert len(samples.read_text().splitlines()) == 2
    report = tmp_path / 'report.json'
    argv = [str(export), '--data_root', str(data_root), '--num_samples', '2', '--steps', '2', '--tau', '1.0',
            '--judge', 'none', '--batch_size', '2', '--out', str(report)]  # fmt: skip
    assert eval_cli.main(argv) == 0
    rows = json.loads(report.read_text())['rows']
    assert [r['kind'] for r in rows][:2] == ['data', 'data (2nd half given 1st)'] and len(rows) == 4
