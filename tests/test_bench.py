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
    """`bench/probe.py` builds its fixtures and classifies each input (here the export CLI's seven
    without a full disk: a malicious pickle, a user's folder, a missing file, a file as the
    destination, a NaN export, its own input as OUT_DIR, a real one), one count per class."""
    printed = run_bench(
        'bench/probe.py', '--work', str(tmp_path / 'probe'), '--only', 'export', '--verbose', '--no_full_disk'
    )
    table = {
        line.split('|')[1].strip(): line.split('|')[-2].strip()
        for line in printed.splitlines()
        if '|' in line
    }
    assert table['one-line error'] == '6' and table['handled'] == '1', printed
    for cls in ('code execution', 'data loss', 'traceback', 'silent', 'unclear'):
        assert table[cls] == '0', printed


def test_the_gpu_check_fits_its_budget_and_names_every_step():
    """The timeouts sum to at most 420 s and every step the script runs has one."""
    import re

    script = (REPO / 'bench' / 'gpu_check.sh').read_text()
    timeouts = dict(item.split(':') for item in re.search(r'TIMEOUTS="([^"]+)"', script).group(1).split())
    assert sum(int(s) for s in timeouts.values()) <= 420, timeouts
    ran = re.findall(r'^(?:\[.*\] \|\| )?step (\w+) ', script, re.M)
    assert ran[0] == 'smoke' and set(ran) == set(timeouts), ran


def test_the_roofline_of_the_flagship_microbatch():
    """cdcd-140m's training microbatch, traced on fake tensors: at most 40 GB of non-matmul traffic
    and an H100 ceiling of at least 30% (57.1 GB and 25.0% before the step's kernels changed)."""
    printed = run_bench('bench/roofline.py', '--config', 'yamls/cdcd-140m.yaml', '--batch_sizes', '64')
    row = next(line for line in printed.splitlines() if line.startswith('| 64 |')).split('|')[1:-1]
    size, kernels, tflop, gigabytes, share, peak, h100, h200 = (cell.strip() for cell in row)
    assert float(gigabytes) <= 40 and float(h100.rstrip('%')) >= 30, printed
    assert 8.0 < float(tflop) < 8.4  # 3 x 332 MFLOPs x 8,192 tokens: the trace sees every matmul
