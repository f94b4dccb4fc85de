"""The benchmarks keep running: `bench/train.py --trainer` prints both rows, `--overhead` its three,
and `bench/gpu_check.sh` refuses clearly without a GPU. They assert what the tables contain, never
how fast anything is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str) -> str:
    """What `python SCRIPT ARGS` prints, from the repository root; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


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


def test_overhead_rows_put_the_composer_path_on_1_and_2_ranks_beside_the_bare_step():
    flags = ['--configs', 'cdcd-tiny', '--batches', '8', '--repeats', '1']
    printed = run_bench('bench/train.py', '--overhead', *flags)
    rows = {line[:34].strip(): line[34:].split() for line in printed.splitlines() if line.startswith('cdcd-')}
    assert set(rows) == {
        'cdcd-tiny bare step',
        'cdcd-tiny composer, 1 process',
        'cdcd-tiny composer, 2 ranks',
    }
    for label, (seconds, ops, vs_bare, *_) in rows.items():
        assert float(seconds) > 0 and int(ops.replace(',', '')) > 0 and vs_bare.endswith('x'), label
    assert rows['cdcd-tiny bare step'][2] == '1.00x' and rows['cdcd-tiny composer, 2 ranks'][3].endswith('x')


def test_gpu_check_refuses_without_a_gpu():
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'PYTHON': sys.executable}
    env.pop('CDCD_GPU_CHECK_REHEARSE', None)
    proc = subprocess.run(
        ['bash', 'bench/gpu_check.sh'], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert 'needs a CUDA GPU' in proc.stderr and 'CDCD_GPU_CHECK_REHEARSE=1' in proc.stderr
    assert proc.stdout == ''  # nothing ran


def test_the_probe_classifies_its_export_inputs(tmp_path):
    """`bench/probe.py` builds its fixtures and classifies each input (here the export CLI's six: a
    malicious pickle, a user's folder, a missing file, a file as the destination, a NaN export, a
    real one), printing one count per class."""
    printed = run_bench('bench/probe.py', '--work', str(tmp_path / 'probe'), '--only', 'export', '--verbose')
    table = {
        line.split('|')[1].strip(): line.split('|')[-2].strip()
        for line in printed.splitlines()
        if '|' in line
    }
    assert table['one-line error'] == '5' and table['handled'] == '1', printed
    for cls in ('code execution', 'data loss', 'traceback', 'silent', 'unclear'):
        assert table[cls] == '0', printed
