"""Every dependency workaround checks what it patches: it applies where its target is the known one,
stays off with one line where not, and never ends a run."""

import ast
import os
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
    """Each subclass notes its version with `require` where it lives, each patch is a function of
    `workarounds` that `apply_all` runs, and each is named in the module's docstring."""
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
    patches = {name for name in workarounds.WORKAROUNDS if callable(getattr(workarounds, name, None))}
    assert required | patches == set(workarounds.WORKAROUNDS) and not required & patches
    applied = (
        (REPO / 'cdcd_composer' / 'workarounds.py').read_text().split('def apply_all')[1].split('\ndef ')[0]
    )
    assert all(name in applied for name in patches)
    for name, workaround in workarounds.WORKAROUNDS.items():
        assert f'`{name}`' in workarounds.__doc__ or f'.{name}`' in workarounds.__doc__, name
        assert workaround.upstream == 'none found' or workaround.upstream.startswith('https://github.com/')


@pytest.mark.parametrize(
    'build',
    [
        lambda: EMA(),
        lambda: AppendingFileLogger(),
        lambda: ResumableProgressBar(),
        lambda: HybridShardConfig(),
    ],
)
def test_a_subclass_workaround_builds_on_a_new_release_with_one_warning(build, monkeypatch, caplog):
    monkeypatch.setattr(workarounds, 'installed_version', lambda package: '99.0.0')
    monkeypatch.setattr(workarounds, '_NOTED', set())
    with caplog.at_level('WARNING', logger='cdcd_composer.workarounds'):
        build()
        build()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and re.search(
        r'was written for \S+ [0-9.]+, found 99\.0\.0; it still applies', lines[0]
    )


def test_a_patch_whose_target_changed_stays_off_with_one_line_and_the_run_goes_on(monkeypatch, caplog):
    """A newer torch or Composer: each patch checks what it patches, never the version."""
    from composer.core.engine import Engine
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    monkeypatch.setattr(workarounds, 'installed_version', lambda package: '99.0.0')

    def unknown(a, b):  # a signature no torch had
        return None, None

    monkeypatch.setattr(_fsdp_collectives, '_get_gradient_divide_factors', unknown)
    monkeypatch.delattr(Engine, '_debug_log')
    with caplog.at_level('WARNING', logger='cdcd_composer.workarounds'):
        off = workarounds.apply_all(trust_checkpoint=False, on_cpu=True)
    assert off == ['gloo_gradient_reductions', 'engine_debug_log']
    assert _fsdp_collectives._get_gradient_divide_factors is unknown  # left as it was
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all('stays off' in line and '\n' not in line for line in lines)
    assert 'found 99.0.0' in lines[0]


def test_the_gloo_patch_follows_the_signature_of_newer_torch(monkeypatch):
    """torch 2.9+ takes a factor and force_sum_reduction_for_comms and returns four values: the
    patch forces SUM collectives on gloo groups and leaves every other group to torch."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    calls = []

    def newer(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type='', factor=None,
              force_sum_reduction_for_comms=False):  # fmt: skip
        calls.append(force_sum_reduction_for_comms)
        return None, 2.0, 'SUM', 'SUM'

    class Group:
        def __init__(self, backend):
            self.backend = backend

    monkeypatch.setattr(_fsdp_collectives, '_get_gradient_divide_factors', newer)
    monkeypatch.setattr(workarounds.torch.distributed, 'get_backend', lambda group: group.backend)
    workarounds.gloo_gradient_reductions()
    patched = _fsdp_collectives._get_gradient_divide_factors
    assert patched(Group('gloo'), None, workarounds.torch.float32, 'cpu', None, False) == (
        None,
        2.0,
        'SUM',
        'SUM',
    )
    patched(Group('nccl'), None, workarounds.torch.float32, device_type='cuda')
    assert calls == [True, False]


def test_a_gpu_run_leaves_the_gloo_collectives_alone(monkeypatch):
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    original = _fsdp_collectives._get_gradient_divide_factors
    monkeypatch.setattr(
        _fsdp_collectives, '_get_gradient_divide_factors', getattr(original, '__wrapped__', original)
    )
    workarounds.apply_all(trust_checkpoint=False, on_cpu=False)
    assert not hasattr(_fsdp_collectives._get_gradient_divide_factors, '__wrapped__')


def test_the_patches_are_idempotent_and_keep_the_original():
    from streaming.base.shared import prefix
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    workarounds.gloo_gradient_reductions()
    once = _fsdp_collectives._get_gradient_divide_factors
    workarounds.gloo_gradient_reductions()
    assert _fsdp_collectives._get_gradient_divide_factors.__wrapped__ is once.__wrapped__
    assert not hasattr(once.__wrapped__, '__wrapped__')  # never a patch of the patch
    namespace = workarounds.streaming_node_namespace()  # node0, or a parallel test worker's own
    workarounds.streaming_node_namespace()
    assert prefix._get_path(3, 'locals') == f'{namespace}_000003_locals'
    assert namespace == os.environ.get(workarounds.SHM_NAMESPACE_ENV, 'node0')


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
