"""Shared fixtures: seeding, a tiny synthetic MDS dataset and a tiny config derived from cdcd-tiny.yaml."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Parallel test workers (`pytest -n 2`, pytest-xdist) run Streaming datasets at the same moment:
# each names its shared memory and locks in its own namespace (`workarounds.streaming_node_namespace`),
# so that two never race for one prefix. The processes they spawn inherit it.
if 'PYTEST_XDIST_WORKER' in os.environ:
    from cdcd_composer.workarounds import SHM_NAMESPACE_ENV

    os.environ.setdefault(SHM_NAMESPACE_ENV, os.environ['PYTEST_XDIST_WORKER'])
    # The cores shared out between the workers: intra-op threads beyond them only wait on each other.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))
    os.environ['OMP_NUM_THREADS'] = str(_threads)
    torch.set_num_threads(_threads)

from s3_server import s3_endpoint, s3_env  # noqa: E402, F401 - fixtures
from shipped import WIDTHS, shrunk_overrides  # noqa: E402

from cdcd_composer.config import load_config  # noqa: E402
from cdcd_composer.data.conversion import convert  # noqa: E402

TINY_MODEL = {**WIDTHS, 'n_layers': 2}  # the shrunk recipes' denoiser


@pytest.fixture(autouse=True)
def seed() -> int:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 train / 64 val synthetic stories on a 96-token canvas with a trained WordPiece tokenizer."""
    root = tmp_path_factory.mktemp('data') / 'synthetic'
    convert(
        source='synthetic', out_root=str(root), seq_len=96, num_train=256, num_val=64, train_tokenizer=512
    )
    return root


@pytest.fixture(scope='session')
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """yamls/cdcd-tiny.yaml shrunk as the shipped-recipe matrix shrinks it, trained: its export.

    The teacher of yamls/cdcd-tiny-distill.yaml shrunk the same way (tests/test_distillation.py).
    """
    from cdcd_composer.commands import train

    out = tmp_path_factory.mktemp('teacher')
    overrides = [*shrunk_overrides('cdcd-tiny', tiny_dataset), 'progress_bar=false']
    cwd = os.getcwd()
    os.chdir(out)  # the YAML's relative runs/ paths
    try:
        train.main(load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), overrides))
    finally:
        os.chdir(cwd)
    return out / 'runs' / 'cdcd-tiny' / 'export'


def tiny_overrides(dataset: Path, out: Path) -> list[str]:
    """yamls/cdcd-tiny.yaml shrunk (`shipped.shrunk_overrides`) to 4 batches, writing under `out`."""
    return [
        *shrunk_overrides('cdcd-tiny', dataset, out, batches=4, eval_every=2, save_every=4),
        'progress_bar=false',
    ]


@pytest.fixture
def tiny_config(tiny_dataset: Path, tmp_path: Path) -> dict:
    """yamls/cdcd-tiny.yaml shrunk (see `tiny_overrides`), writing under tmp_path."""
    return load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), tiny_overrides(tiny_dataset, tmp_path))


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', '1'))


def launch_two_ranks(script: Path, args: list[str], tmp_path: Path, strategy: str | None = None) -> None:
    """Runs `composer -n 2 script args` on CPU (gloo) and fails with the ranks' errors.

    strategy='fsdp2' adds the sharded-checkpoint override a train.py driver needs under FSDP2.
    """
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('FSDP_VERSION', None)  # train.py's default, FSDP2, is what runs
    if strategy == 'fsdp2':
        args = [*args, 'parallelism_config.fsdp.state_dict_type=sharded']
    launcher = Path(sys.executable).parent / 'composer'
    cmd = [str(launcher), '-n', '2', '--stderr', str(tmp_path / 'err{rank}.txt'), str(script), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = [tmp_path / f'err{rank}.txt' for rank in (0, 1)]
    errors = ''.join(log.read_text()[-1500:] for log in logs if log.exists())
    assert proc.returncode == 0, proc.stderr[-1500:] + errors


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    lines = importtime_stderr.splitlines()
    return {line.rsplit('|', 1)[-1].strip() for line in lines if line.startswith('import time:')}


def kill_when_paused(cmd: list[str], markers: list[Path], env: dict, cwd: Path | None = None) -> None:
    """Starts `cmd` in its own process group and SIGKILLs the group once every rank wrote its marker.

    `loss_recording_driver.py` pauses each rank once its checkpoint is saved (and, on an object
    store, its pointer uploaded), so where the run dies depends on events, not on how busy the
    machine is. `cwd`: where the run's relative paths (`runs/...`) land.
    """
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 900  # only a hang gets here
    while not all(m.exists() for m in markers):
        assert proc.poll() is None, f'the run ended before it paused: {proc.stderr.read()[-2000:]}'
        assert time.monotonic() < deadline, 'the run never paused'
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# The files that launch the most processes (minutes each), longest first. Collected first, so that
# parallel workers (`pytest -n 2 --dist loadfile`, as `make test` runs) start them at once and end
# together, instead of one worker finishing the longest file alone.
LONG_FILES = ('test_resume.py', 'test_shipped_recipes.py', 'test_elastic.py', 'test_bench.py')


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long files first (`LONG_FILES`); tests marked `gpu` skipped without CUDA, saying so (`-rs`)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest in order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason='needs a CUDA GPU (marker gpu); run them with `make test-gpu` where one is'
    )
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


# -- the fast lane: a test not marked `slow` neither fits a Composer Trainer nor spawns an interpreter --
_RUNNING: list[pytest.Item] = []  # the test whose setup, call or teardown runs now


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()


def _refuse_outside_slow(what: str) -> None:
    """Fails the running test unless it is marked `slow` (its fixtures' work counts as its own)."""
    item = _RUNNING[-1] if _RUNNING else None
    if item is not None and item.get_closest_marker('slow') is None:
        pytest.fail(
            f'{item.nodeid} {what} but is not marked slow: mark it `slow` (make test-fast runs neither)'
        )


def _spawns_an_interpreter(args: object) -> bool:
    words = [args] if isinstance(args, (str, os.PathLike)) else list(args or [])
    head = os.path.basename(str(words[0])) if words else ''
    return bool(words) and (
        head.startswith(('python', 'composer', 'moto_server')) or str(words[0]) == sys.executable
    )


@pytest.fixture(autouse=True, scope='session')
def _fast_lane_guard():
    """Trainer.fit and a spawned Python interpreter fail a test not marked slow (`make test-fast`)."""
    from composer import Trainer

    fit, popen = Trainer.fit, subprocess.Popen.__init__

    def guarded_fit(self, *args, **kwargs):
        _refuse_outside_slow('trains through Composer (Trainer.fit)')
        return fit(self, *args, **kwargs)

    def guarded_popen(self, args, *rest, **kwargs):
        if _spawns_an_interpreter(args):
            _refuse_outside_slow('spawns a Python interpreter')
        return popen(self, args, *rest, **kwargs)

    Trainer.fit, subprocess.Popen.__init__ = guarded_fit, guarded_popen
    yield
    Trainer.fit, subprocess.Popen.__init__ = fit, popen
