"""A malicious pickle never runs without the explicit trust flag, on any path that unpickles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import generate
import train
from cdcd_composer import trust as checkpoint
from cdcd_composer.config import parse_config
from export import main as export_main


class Payload:
    """Unpickling this writes `marker`: proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").write("ran")',)


def write_evil(path: Path, marker: Path) -> Path:
    torch.save({'state': Payload(marker)}, path)
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A malicious checkpoint in a directory anyone can write to, and its marker file."""
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, no sticky bit: anyone could have put it there
    marker = tmp_path / 'marker'
    return write_evil(shared / 'evil.pt', marker), marker


def loaders(pt: Path, tiny_dataset: Path, tmp_path: Path) -> dict:
    return {
        'generate.py': lambda *flag: generate.main([str(pt), '--steps', '1', '--num_samples', '1', *flag]),
        'eval.py': lambda *flag: eval_cli.main([str(pt), '--data_root', str(tiny_dataset), '--judge', 'none',
                                                '--num_samples', '1', '--steps', '1', *flag]),
        'export': lambda *flag: export_main([str(pt), str(tmp_path / 'out'), *flag]),
    }  # fmt: skip


@pytest.mark.parametrize('entry', ['generate.py', 'eval.py', 'export'])
def test_untrusted_pickle_never_runs_without_the_flag(evil, entry, tiny_dataset, tmp_path, capsys):
    pt, marker = evil
    run = loaders(pt, tiny_dataset, tmp_path)[entry]
    assert run() == 2
    err = capsys.readouterr().err
    assert f'others can write to its directory {pt.parent}' in err and '--trust_checkpoint' in err
    assert not marker.exists()
    # The payload is live: with the flag it runs (then the file is refused as no checkpoint of ours).
    assert run('--trust_checkpoint') == 2
    assert marker.exists()


def test_train_load_path_is_checked_before_composer_sees_it(evil, tiny_config):
    pt, marker = evil
    with pytest.raises(ValueError, match='refusing to unpickle .* its directory .* trust_checkpoint=true'):
        train.validate(parse_config(dict(tiny_config, load_path=str(pt))))
    assert not marker.exists()
    missing = dict(tiny_config, load_path=str(pt.parent / 'nope.pt'))
    with pytest.raises(ValueError, match='load_path .*nope.pt not found'):
        train.validate(parse_config(missing))
    train.validate(parse_config(dict(tiny_config, load_path=str(pt), trust_checkpoint=True)))  # accepted


def test_a_file_swapped_after_the_check_is_not_the_one_loaded(tmp_path, monkeypatch):
    good, evil_path, marker = tmp_path / 'good.pt', tmp_path / 'evil.pt', tmp_path / 'marker'
    torch.save({'state': 'good'}, good)
    write_evil(evil_path, marker)
    checked = checkpoint.untrusted_reason

    def check_then_swap(path, info=None):
        reason = checked(path, info)
        os.replace(evil_path, good)  # an attacker wins the race right after the check
        return reason

    monkeypatch.setattr(checkpoint, 'untrusted_reason', check_then_swap)
    assert checkpoint.load_local_pickle(str(good), trust=False) == {'state': 'good'}
    assert not marker.exists()


def test_a_world_writable_pickle_in_a_safe_directory_is_refused(tmp_path):
    pt = tmp_path / 'model.pt'
    torch.save({'state': 1}, pt)
    pt.chmod(0o666)
    with pytest.raises(ValueError, match='others can write to it:'):
        checkpoint.load_local_pickle(str(pt), trust=False)


def test_a_text_file_given_as_a_checkpoint_is_one_line(tmp_path, capsys):
    pt = tmp_path / 'notes.pt'
    pt.write_text('not a checkpoint\n')
    assert generate.main([str(pt), '--steps', '1', '--num_samples', '1']) == 2
    err = capsys.readouterr().err
    assert 'notes.pt is not a PyTorch checkpoint' in err and len(err.strip().splitlines()) == 1
