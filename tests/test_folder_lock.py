"""One writer per save folder: a live run's lock refuses a second run in one line, before any work."""

import os

import pytest

from cdcd_composer.commands import train
from cdcd_composer.storage import LOCK_FILE, Folder, StorageError


def test_a_second_run_on_a_held_save_folder_is_refused_before_any_work(tiny_config, tmp_path):
    folder = tmp_path / 'checkpoints'
    with Folder(str(folder)).lock():  # another run, live (flock: any other open of the lock conflicts)
        with pytest.raises(StorageError, match=r'is being written by another process \(pid \d+') as error:
            train.main(tiny_config)
    assert '\n' not in str(error.value)
    assert os.listdir(folder) == [LOCK_FILE]  # nothing written: no checkpoint, no log


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


def test_an_object_store_save_folder_says_it_is_not_locked(tiny_config, caplog):
    cfg = train.parse_config({**tiny_config, 'save_folder': 's3://bucket/{run_name}/checkpoints'})
    with caplog.at_level('WARNING', logger='train'):
        train.hold_save_folder(cfg)
    assert 'nothing stops a second run' in caplog.text
