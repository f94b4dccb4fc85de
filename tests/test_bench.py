"""The benchmarks keep running: `bench/train.py --trainer` prints both rows, and `bench/gpu_check.sh`
refuses clearly without a GPU. They assert what the tables contain, never how fast anything is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_trainer_row_runs_the_composer_path_beside_the_bare_step():
    cmd = [
        sys.executable, 'bench/train.py', '--trainer', '--configs', 'cdcd-tiny', '--vocab_size', '64',
        '--batch_size', '4', '--seq_len', '32', '--batches', '4', '--steps', '1', '--device', 'cpu',
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {
        line.split('  ')[0]: line.split() for line in proc.stdout.splitlines() if line.startswith('cdcd-')
    }
    assert set(rows) == {'cdcd-tiny bare step', 'cdcd-tiny composer train.py'}
    bare, composer = rows['cdcd-tiny bare step'], rows['cdcd-tiny composer train.py']
    assert bare[-1] == '1.00x' and composer[-1].endswith('x') and float(composer[-1][:-1]) > 0
    assert float(composer[-6]) > 0 and float(bare[-6]) > 0  # tokens/s


def test_gpu_check_refuses_without_a_gpu():
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'PYTHON': sys.executable}
    env.pop('CDCD_GPU_CHECK_REHEARSE', None)
    proc = subprocess.run(
        ['bash', 'bench/gpu_check.sh'], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert 'needs a CUDA GPU' in proc.stderr and 'CDCD_GPU_CHECK_REHEARSE=1' in proc.stderr
    assert proc.stdout == ''  # nothing ran
