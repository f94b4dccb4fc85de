"""Nothing the program did not write is deleted: a run's folder survives exports pointed at it.

The converter's side of the rule is tested in test_convert.py.
"""

from __future__ import annotations

import pytest
from conftest import REPO, tiny_overrides

from cdcd_composer.commands import train
from cdcd_composer.commands.export import main as export_main
from cdcd_composer.config import load_config, parse_config
from cdcd_composer.storage import StorageError


@pytest.mark.slow
def test_an_export_into_the_run_folder_is_refused_before_training(tiny_dataset, tmp_path):
    out = tmp_path / 'run'
    overrides = [*tiny_overrides(tiny_dataset, out), f'callbacks.export_weights.folder={out}']
    cfg = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), overrides)
    trainer = train.main(cfg, return_trainer=True, do_train=False)  # the file logger has written logs-0.txt
    with pytest.raises(StorageError, match=r'run holds files cdcd-composer did not write'):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0  # refused at FIT_START, before any step
    assert (out / 'logs-0.txt').exists()


@pytest.mark.slow
def test_the_export_cli_never_replaces_the_run_folder(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'run'
    train.main(load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), tiny_overrides(tiny_dataset, out)))
    checkpoint = out / 'checkpoints' / 'latest-rank0.pt'
    assert export_main([str(checkpoint), str(out)]) == 2
    assert 'would write over' in capsys.readouterr().err  # the folder holds the checkpoint exported
    users = tmp_path / 'users'
    users.mkdir()
    (users / 'notes.txt').write_text('mine')
    assert export_main([str(checkpoint), str(users)]) == 2  # not an input, but not ours either
    assert 'holds files cdcd-composer did not write' in capsys.readouterr().err
    assert (users / 'notes.txt').read_text() == 'mine'
    assert checkpoint.exists() and (out / 'logs-0.txt').exists() and (out / 'export').exists()
    # Its own earlier export, though, is replaced in place.
    assert export_main([str(checkpoint), str(out / 'export')]) == 0


@pytest.mark.slow
@pytest.mark.parametrize('name', ['manifest.json', 'cdcd_dataset.json', 'cdcd_config.json'])
def test_a_users_file_named_like_ours_does_not_make_the_folder_ours(tiny_dataset, tmp_path, name, capsys):
    """Only the `.cdcd-owned` marker makes a folder ours: the export CLI and the export callback
    refuse a folder holding the user's own file of a name our formats use."""
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / name).write_text('{"mine": true}')
    out = tmp_path / 'run'
    overrides = [*tiny_overrides(tiny_dataset, out), f'callbacks.export_weights.folder={mine}']
    with pytest.raises(StorageError, match=r'mine holds files cdcd-composer did not write'):
        train.validate(parse_config(load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), overrides)))
    train.main(load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), tiny_overrides(tiny_dataset, out)))
    assert export_main([str(out / 'checkpoints' / 'latest-rank0.pt'), str(mine)]) == 2
    assert 'mine holds files cdcd-composer did not write' in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == [name] and (mine / name).read_text() == '{"mine": true}'


def test_a_save_folder_under_a_file_is_named_before_training(tiny_config, tmp_path):
    (tmp_path / 'runs').write_text('a file where a folder should be')
    cfg = dict(tiny_config, save_folder=str(tmp_path / 'runs' / 'checkpoints'))
    with pytest.raises(ValueError, match=r'save_folder .*: .*runs is a file, not a folder'):
        train.validate(parse_config(cfg))


@pytest.mark.slow
def test_checkpoint_rotation_deletes_only_the_checkpoints_it_wrote(tiny_config, tmp_path):
    """A save_folder that already holds the user's files: keeping one checkpoint, saved every batch,
    rotates through Composer's own files and leaves the user's as they were."""
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'notes.txt').write_text('mine')
    (folder / 'ep0-ba9-notes.json').write_text('{"mine": true}')
    cfg = dict(tiny_config, save_folder=str(folder), save_interval='1ba', save_num_checkpoints_to_keep=1)
    train.main(cfg)
    assert (folder / 'notes.txt').read_text() == 'mine'
    assert (folder / 'ep0-ba9-notes.json').read_text() == '{"mine": true}'
    assert sorted(p.name for p in folder.glob('ep*-rank0.pt')) == ['ep0-ba4-rank0.pt']
