"""One writer per save folder: a live run's lock refuses a second run in one line, before any work."""

import os
import socket
import subprocess
import sys
import time

import pytest

from cdcd_composer.commands import train
from cdcd_composer.storage import LEASE_EXPIRES_S, LEASE_FILE, LOCK_FILE, Folder, StorageError


def test_a_second_run_on_a_held_save_folder_is_refused_before_any_work(tiny_config, tmp_path):
    folder = tmp_path / 'checkpoints'
    with Folder(str(folder)).lock():  # another run, live (flock: any other open of the lock conflicts)
        with pytest.raises(StorageError, match=r'is being written by another process \(pid \d+') as error:
            train.main(tiny_config)
    assert '\n' not in str(error.value)
    assert os.listdir(folder) == [LOCK_FILE]  # nothing written: no checkpoint, no log


@pytest.mark.slow
def test_the_lock_is_held_while_the_run_lives_and_handed_on_after(tiny_config, tmp_path):
    folder = tmp_path / 'checkpoints'
    trainer = train.main(tiny_config, return_trainer=True, do_train=False)
    assert trainer is not None
    with Folder(str(folder)).lock():  # released when main returned: the next run takes it
        pass
    train.hold_save_folder(train.parse_config(tiny_config))
    with pytest.raises(StorageError, match='is being written by another process'):
        with Folder(str(folder)).lock():
            pass
    train.HELD_FOLDERS.close()


@pytest.mark.slow
def test_an_object_store_save_folder_is_held_by_a_lease(tiny_config, s3_env):
    folder = f's3://{s3_env()}/run/checkpoints'
    train.hold_save_folder(train.parse_config({**tiny_config, 'save_folder': folder}))
    try:
        lease = Folder(folder).read_json(LEASE_FILE)
        assert lease['pid'] == os.getpid()
        held_elsewhere = {**lease, 'id': 'another', 'pid': 1, 'host': 'another-host'}
    finally:
        train.HELD_FOLDERS.close()
    assert Folder(folder).read_json(LEASE_FILE) is None  # the run's end hands the folder on
    Folder(folder).write_json(LEASE_FILE, {**held_elsewhere, 'renewed': time.time()})  # live, elsewhere
    with pytest.raises(StorageError, match=r'another process \(pid 1 on another-host') as error:
        train.main({**tiny_config, 'save_folder': folder})
    assert '\n' not in str(error.value)


@pytest.mark.slow
def test_a_lease_left_by_a_dead_writer_is_taken_over(s3_env):
    root = Folder(f's3://{s3_env()}/data')
    expired = {'id': 'old', 'host': 'another-host', 'pid': 1, 'renewed': time.time() - LEASE_EXPIRES_S - 1}
    root.write_json(LEASE_FILE, expired)
    with root.lock():
        assert root.read_json(LEASE_FILE)['pid'] == os.getpid()
    script = 'import os; print(os.getpid())'
    dead = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
    sigkilled = {'id': 'dead', 'host': socket.gethostname(), 'pid': int(dead.stdout), 'renewed': time.time()}
    root.write_json(LEASE_FILE, sigkilled)  # this host, its process gone: no need to wait for expiry
    with root.lock():
        pass
