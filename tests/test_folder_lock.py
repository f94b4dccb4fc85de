"""One writer per save folder: a live run's lock refuses a second run; a dead run's is taken over."""

import json
import os
import socket
import subprocess

import pytest

from cdcd_composer.checkpoints import folder_lock
from cdcd_composer.checkpoints.folder_lock import (
    LOCK_NAME,
    FolderLock,
    hold_save_folder,
    release_save_folders,
)


def write_lock(folder, pid, host=None, start=None):
    folder.mkdir(parents=True, exist_ok=True)
    holder = {
        'host': host or socket.gethostname(),
        'pid': pid,
        'start': start or folder_lock._start_time(pid),
    }
    (folder / LOCK_NAME).write_text(json.dumps(holder))


@pytest.fixture
def live_process():
    proc = subprocess.Popen(['sleep', '600'])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_runs_lock_refuses_a_second_run_in_one_line(tmp_path, live_process):
    write_lock(tmp_path / 'ckpt', live_process)
    with pytest.raises(ValueError, match=rf'is in use by a live run \(pid {live_process} on ') as error:
        FolderLock(str(tmp_path / 'ckpt')).acquire()
    assert '\n' not in str(error.value)
    assert json.loads((tmp_path / 'ckpt' / LOCK_NAME).read_text())['pid'] == live_process  # untouched


@pytest.mark.parametrize('kind', ['dead', 'torn', 'pid reused'])
def test_a_stale_lock_is_taken_over_and_released(tmp_path, live_process, kind, caplog):
    folder = tmp_path / 'ckpt'
    if kind == 'dead':
        gone = subprocess.Popen(['true'])
        gone.wait()
        write_lock(folder, gone.pid)
    elif kind == 'torn':
        folder.mkdir()
        (folder / LOCK_NAME).write_text('{"host": "')
    else:  # the pid lives, but it is another process than the one that locked
        write_lock(folder, live_process, start='1')
    lock = hold_save_folder(str(folder), remote=False)
    assert json.loads((folder / LOCK_NAME).read_text())['pid'] == os.getpid()
    assert 'taking over the stale lock' in caplog.text
    hold_save_folder(str(folder), remote=False)  # the same process again: fine
    release_save_folders()
    assert not (folder / LOCK_NAME).exists() and lock is not None


def test_a_lock_from_another_host_names_it_and_the_way_out(tmp_path):
    write_lock(tmp_path, 1234, host='node-7', start='99')
    with pytest.raises(ValueError, match=r'locked by pid 1234 on host node-7, .* delete .*\.cdcd-run\.lock'):
        FolderLock(str(tmp_path)).acquire()


def test_an_object_store_save_folder_says_it_is_not_locked(caplog):
    assert hold_save_folder('s3://bucket/run/checkpoints', remote=True) is None
    assert 'nothing stops a second run' in caplog.text


def test_train_refuses_a_save_folder_a_live_run_holds_before_any_work(tiny_config, tmp_path, live_process):
    from cdcd_composer.commands import train

    folder = tmp_path / 'checkpoints'
    write_lock(folder, live_process)
    with pytest.raises(ValueError, match='is in use by a live run'):
        train.main(tiny_config)
    assert os.listdir(folder) == [LOCK_NAME]
