"""Storage faults are one line and leave nothing behind: free space is checked before a checkpoint,
an export or a shard is written, and a full disk, a failing device or a lost object store met while
writing says which path failed, what is left and how to go on.

The disk is made full by reporting less free space (`shutil.disk_usage`) or by failing the write the
way the libraries do (torch.save's RuntimeError over an OSError, safetensors' own error text): a real
full disk needs a mount this suite cannot make everywhere. `bench/probe.py` runs the same cases on
a real small tmpfs where the machine allows it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from composer.core import Callback
from conftest import REPO, tiny_overrides

from cdcd_composer.commands import train
from cdcd_composer.commands.convert import main as convert_main
from cdcd_composer.commands.export import main as export_main
from cdcd_composer.config import load_config, parse_config
from cdcd_composer.storage import storage_fault

Usage = namedtuple('Usage', 'total used free')
real_disk_usage = shutil.disk_usage


def full_when(condition) -> callable:
    """A `shutil.disk_usage` that reports 1 KB free while `condition(path)` holds."""
    return lambda path: Usage(10**12, 10**12, 1000) if condition(Path(path)) else real_disk_usage(path)


def fit(cfg: dict, *setup: Callback) -> tuple[int, str, Path]:
    """Trains `cfg` through `train.py`'s own handler; returns its exit status, stderr and save folder."""
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    trainer.state.callbacks.extend(setup)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        train.fit_or_say_where_it_stopped(trainer, parse_config(cfg))
    trainer.close()
    return stop.value.code, err.getvalue().strip(), Path(cfg['save_folder'])


def shrunk(tiny_dataset: Path, out: Path, *extra: str) -> dict:
    overrides = [*tiny_overrides(tiny_dataset, out), 'save_interval=2ba', 'save_num_checkpoints_to_keep=-1']
    return load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), [*overrides, *extra])


@pytest.fixture(scope='module')
def refused_run(tmp_path_factory, tiny_dataset) -> tuple[int, str, Path]:
    """A run whose disk has room for its first checkpoint (batch 2), then fills up."""
    cfg = shrunk(tiny_dataset, tmp_path_factory.mktemp('run'))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shutil, 'disk_usage', full_when(lambda p: any(Path(cfg['save_folder']).glob('*.pt'))))
        return fit(cfg)


def test_a_fault_is_found_through_the_wrappers_that_raise_it():
    try:
        try:
            raise OSError(errno.ENOSPC, 'No space left on device', '/ckpt/ep0-ba4-rank0.pt')
        except OSError:  # torch.save: its zip writer fails next, and says nothing of the disk
            raise RuntimeError('[enforce fail at inline_container.cc:659] . unexpected pos 6248320')  # noqa: B904
    except RuntimeError as e:
        assert storage_fault(e) == '/ckpt/ep0-ba4-rank0.pt: No space left on device'
    safetensors = Exception('Error while serializing: I/O error: No space left on device (os error 28)')
    assert storage_fault(safetensors) == 'No space left on device'
    from botocore.exceptions import EndpointConnectionError

    lost = EndpointConnectionError(endpoint_url='http://127.0.0.1:9/bucket')
    assert storage_fault(RuntimeError('upload failed')) is None
    assert storage_fault(lost).startswith('the object store is unreachable (Could not connect')
    assert storage_fault(ValueError('n_heads must be positive')) is None


@pytest.mark.slow
def test_a_full_disk_stops_the_run_before_the_next_checkpoint_in_one_line(refused_run):
    code, err, folder = refused_run
    assert code == 1 and '\n' not in err
    assert err.startswith(f'error: the checkpoint {folder}/ep0-ba4-rank0.pt: its disk has 1.0 KB free')
    assert err.endswith(f'stopped at batch 4; the newest checkpoint is {folder}/ep0-ba2-rank0.pt: the same '
                        'command resumes from it')  # fmt: skip
    assert sorted(p.name for p in folder.glob('*.pt')) == ['ep0-ba2-rank0.pt', 'latest-rank0.pt']


@pytest.mark.slow
def test_a_checkpoint_cut_short_by_a_full_disk_is_removed(tiny_dataset, tmp_path, monkeypatch):
    from composer.utils import checkpoint

    def write_half(state_dict, filename):  # what torch.save does when the disk fills mid-file
        with open(filename, 'wb') as f:
            f.write(b'PK\x03\x04' + bytes(1000))
        try:
            raise OSError(errno.ENOSPC, 'No space left on device')
        except OSError:
            raise RuntimeError('[enforce fail at inline_container.cc:659] . unexpected pos 1004 vs 900')  # noqa: B904

    monkeypatch.setattr(checkpoint, '_write_checkpoint_file', write_half)
    code, err, folder = fit(shrunk(tiny_dataset, tmp_path))
    assert code == 1 and '\n' not in err
    partial = folder / 'ep0-ba2-rank0.pt'
    assert err == (f'error: No space left on device; removed the incomplete checkpoint {partial}; stopped at '
                   'batch 2; no checkpoint was kept, so a rerun starts afresh')  # fmt: skip
    assert not list(folder.glob('*.pt'))


class LoseTheStore(Callback):
    """What an object store that stops answering raises from inside a run (a download, an upload)."""

    def after_backward(self, state, logger):
        from botocore.exceptions import EndpointConnectionError

        raise RuntimeError('checkpoint upload failed') from EndpointConnectionError(
            endpoint_url='http://s3:9'
        )


@pytest.mark.slow
def test_a_lost_object_store_is_one_line_saying_where_the_run_stands(tiny_dataset, tmp_path):
    code, err, _ = fit(shrunk(tiny_dataset, tmp_path), LoseTheStore())
    assert code == 1 and '\n' not in err
    assert err == ('error: the object store is unreachable (Could not connect to the endpoint URL: "http://s3:9")'
                   '; stopped at batch 0; no checkpoint was kept, so a rerun starts afresh')  # fmt: skip


@pytest.mark.slow
def test_no_room_for_the_final_export_is_found_before_training(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, 'disk_usage', full_when(lambda p: p == tmp_path))  # where export/ will be
    code, err, folder = fit(shrunk(tiny_dataset, tmp_path))
    assert code == 1 and '\n' not in err
    assert err.startswith(
        f'error: callbacks.export_weights.folder {tmp_path}/export: its disk has 1.0 KB free'
    )
    assert 'stopped at batch 0' in err and not list(folder.glob('*.pt'))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize('format', ['cdcd', 'hf'])
def test_an_export_needs_room_and_a_failed_one_leaves_the_old(
    refused_run, tmp_path, monkeypatch, capsys, format
):
    checkpoint = str(refused_run[2] / 'ep0-ba2-rank0.pt')
    out = tmp_path / 'export'
    with monkeypatch.context() as mp:
        mp.setattr(shutil, 'disk_usage', full_when(lambda p: True))
        assert export_main([checkpoint, str(out), '--format', format]) == 1  # failed while working
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith('error: writing the ')
        and f'to {out}: its disk has 1.0 KB free' in err
        and '\n' not in err
    )
    assert list(tmp_path.iterdir()) == []

    assert export_main([checkpoint, str(out), '--format', format]) == 0
    before = digest(out)
    import safetensors.torch

    def disk_fills(*args, **kwargs):
        raise Exception('Error while serializing: I/O error: No space left on device (os error 28)')  # noqa: TRY002

    monkeypatch.setattr(safetensors.torch, 'save_file', disk_fills)
    assert export_main([checkpoint, str(out), '--format', format]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f'{out} failed (No space left on device): {out} is as it was: free space and rerun')
    assert digest(out) == before and [p.name for p in tmp_path.iterdir()] == ['export']  # no staging left


@pytest.mark.parametrize('when', ['before', 'while'])
def test_a_conversion_to_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys, when):
    out = tmp_path / 'data'
    if when == 'before':
        monkeypatch.setattr(shutil, 'disk_usage', full_when(lambda p: True))
    else:
        from streaming import MDSWriter

        def disk_fills(self, sample):
            raise OSError(errno.ENOSPC, 'No space left on device', f'{self.local}/shard.00000.mds')

        monkeypatch.setattr(MDSWriter, 'write', disk_fills)
    argv = ['--source', 'synthetic', '--num_train', '64', '--num_val', '16', '--train_tokenizer', '300',
            '--out_root', str(out), '--no_progress']  # fmt: skip
    assert convert_main(argv) == 1  # a failure while working, not a usage error
    err = capsys.readouterr().err.strip()
    assert '\n' not in err
    if when == 'before':
        assert err.startswith(f'error: writing the tokenizer to {out}/tokenizer: its disk has 1.0 KB free')
    else:
        assert err.startswith(f'error: writing the dataset {out} failed ({out}/.tmp-train-')
        assert err.endswith('No space left on device): completed splits are kept: free space and rerun the '
                            'same command to finish')  # fmt: skip
    assert not [p for p in out.iterdir() if p.name.startswith('.tmp-')]  # no staging left
