"""Every dependency workaround is guarded: written for the pinned versions, loud when they change."""

import ast
import re

import pytest
from conftest import REPO

from cdcd_composer import workarounds
from cdcd_composer.algorithms import EMA
from cdcd_composer.loggers import AppendingFileLogger, ResumableProgressBar
from cdcd_composer.sharding import HybridShardConfig


def test_the_pins_of_the_workarounds_are_the_pins_of_setup_py():
    pins = dict(re.findall(r"'([a-z-]+)==([0-9.]+)'", (REPO / 'setup.py').read_text()))
    assert {package: pins[package] for package in workarounds.PINNED} == workarounds.PINNED
    for name in workarounds.WORKAROUNDS:
        workarounds.require(name)  # the installed versions are the pinned ones


def test_every_workaround_is_listed_guarded_and_documented():
    """Each entry is checked by `require` where it lives, and named in the module's docstring."""
    sources = {path: path.read_text() for path in (REPO / 'cdcd_composer').rglob('*.py')}
    required = {
        node.args[0].value
        for text in sources.values()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call)
        and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'require'
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert required == set(workarounds.WORKAROUNDS)
    for name, workaround in workarounds.WORKAROUNDS.items():
        assert f'`{name}`' in workarounds.__doc__ or f'.{name}`' in workarounds.__doc__, name
        assert workaround.upstream == 'none found' or workaround.upstream.startswith('https://github.com/')


@pytest.mark.parametrize(
    'build',
    [
        workarounds.gloo_gradient_reductions,
        workarounds.streaming_releases_probed_blocks,
        workarounds.engine_debug_log,
        workarounds.autoresume_downloads_the_newest,
        workarounds.checkpoint_pointer_follows_its_upload,
        lambda: workarounds.weights_only_composer_loads(trust=False),
        lambda: EMA(),
        lambda: AppendingFileLogger(),
        lambda: ResumableProgressBar(),
        lambda: HybridShardConfig(),
    ],
)
def test_a_new_release_stops_a_workaround_before_it_patches(build, monkeypatch):
    monkeypatch.setattr(workarounds, 'installed_version', lambda package: '99.0.0')
    with pytest.raises(RuntimeError, match=r'was written for \S+ [0-9.]+, found 99\.0\.0; upstream: '):
        build()


def test_the_patches_are_idempotent_and_keep_the_original():
    from streaming.base.shared import prefix
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    workarounds.gloo_gradient_reductions()
    once = _fsdp_collectives._get_gradient_divide_factors
    workarounds.gloo_gradient_reductions()
    assert _fsdp_collectives._get_gradient_divide_factors.__wrapped__ is once.__wrapped__
    assert not hasattr(once.__wrapped__, '__wrapped__')  # never a patch of the patch
    workarounds.streaming_node_namespace()
    workarounds.streaming_node_namespace()
    assert prefix._get_path(3, 'locals') == 'node0_000003_locals'


def test_the_engine_formats_debug_lines_only_when_asked(monkeypatch, caplog):
    """Without $ENGINE_DEBUG the prefix (which reads the state) is never built; with it, Composer's line."""
    from composer.core import Event
    from composer.core.engine import Engine

    class Unread:
        @property
        def state(self):
            raise AssertionError('the debug prefix was built')

    workarounds.engine_debug_log()
    workarounds.engine_debug_log()
    assert not hasattr(Engine._debug_log.__wrapped__, '__wrapped__')
    monkeypatch.delenv('ENGINE_DEBUG', raising=False)
    Engine._debug_log(Unread(), Event.BATCH_START, 'Running event')

    class Read:
        class state:
            class timestamp:
                epoch, batch = 0, 7

    monkeypatch.setenv('ENGINE_DEBUG', '1')
    with caplog.at_level('DEBUG', logger='composer.core.engine'):
        Engine._debug_log(Read(), Event.BATCH_START, 'Running event')
    assert '[ep=0][ba=7][event=BATCH_START]: Running event' in caplog.text


def test_an_object_store_autoresume_never_loads_an_earlier_resumes_copy(tmp_path, monkeypatch):
    """Composer downloads the resumed checkpoint to ./s3:/bucket/... and reuses it if present:
    the patch removes that copy before Composer looks, for a URI save_folder only."""
    from composer.trainer.trainer import Trainer

    seen = []

    def composers(self, save_folder, save_latest_filename, *args, **kwargs):
        seen.append([p.name for p in (tmp_path / 's3:' / 'bucket' / 'run' / 'ckpt').glob('*')])
        return None

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Trainer, '_get_autoresume_checkpoint', composers)
    workarounds.autoresume_downloads_the_newest()
    assert Trainer._get_autoresume_checkpoint.__wrapped__ is composers

    class State:
        run_name = 'run'

    trainer = type('T', (), {'state': State()})()
    stale = tmp_path / 's3:' / 'bucket' / 'run' / 'ckpt' / 'latest-rank0.pt'
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b'the first resume downloaded this')
    (stale.parent / 'mine.txt').write_text('kept')
    Trainer._get_autoresume_checkpoint(
        trainer, 's3://bucket/{run_name}/ckpt', 'latest-rank{rank}.pt', '', [], False
    )
    assert seen == [['mine.txt']]  # Composer found no copy, so it downloads the newest
    local = tmp_path / 'local' / 'latest-rank0.pt'
    local.parent.mkdir()
    local.write_bytes(b'a local run')
    Trainer._get_autoresume_checkpoint(trainer, str(local.parent), 'latest-rank{rank}.pt', '', [], False)
    assert local.read_bytes() == b'a local run'  # a local save_folder is Composer's as it is


def test_a_checkpoint_saver_looks_for_its_upload_every_second(tmp_path):
    """Composer waits 30 s between looks before it uploads the `latest` pointer; the patch, 1 s."""
    from composer.callbacks import CheckpointSaver

    workarounds.checkpoint_pointer_follows_its_upload()
    workarounds.checkpoint_pointer_follows_its_upload()
    assert not hasattr(CheckpointSaver.__init__.__wrapped__, '__wrapped__')
    saver = CheckpointSaver(folder=str(tmp_path))
    assert saver._symlink_upload_wait_before_next_try_in_seconds == workarounds.POINTER_POLL_SECONDS == 1.0
    unpatched = object.__new__(CheckpointSaver)
    CheckpointSaver.__init__.__wrapped__(unpatched, folder=str(tmp_path))
    assert unpatched._symlink_upload_wait_before_next_try_in_seconds == 30.0  # Composer's, still there


def test_the_package_exports_resolve():
    import cdcd_composer

    for name in cdcd_composer.__all__:
        assert getattr(cdcd_composer, name).__name__ == name
