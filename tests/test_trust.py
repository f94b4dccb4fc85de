"""No pickle runs code without the explicit trust flag, on any path that reads a checkpoint.

Every read is weights-only (`cdcd_composer.checkpoints.trust`): a malicious pickle is refused wherever it
lies and whoever owns it, and a real checkpoint loads from anywhere.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from cdcd_composer import workarounds
from cdcd_composer.checkpoints import trust
from cdcd_composer.commands import evaluate as eval_cli
from cdcd_composer.commands import generate, train
from cdcd_composer.commands.export import main as export_main
from cdcd_composer.config import parse_config


class Payload:
    """Unpickling this writes `marker`: proof that the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").write("ran")',)


def write_evil(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state': Payload(marker)}, path)
    return path


PLACES = ['private', 'world-writable directory', 'another user']


def plant(tmp_path: Path, place: str, name: str = 'evil.pt') -> tuple[Path, Path]:
    """A malicious checkpoint in `place` and its marker file (which must never appear)."""
    folder = tmp_path / place.replace(' ', '-')
    folder.mkdir()
    if place == 'world-writable directory':
        folder.chmod(0o777)  # no sticky bit: anyone could have put it there
    marker = tmp_path / 'marker'
    pt = write_evil(folder / name, marker)
    if place == 'another user':
        if os.geteuid() != 0:
            pytest.skip('chown to another user needs root')
        os.chown(pt, 65534, 65534)
    return pt, marker


def loaders(pt: Path, tiny_dataset: Path, tmp_path: Path) -> dict:
    return {
        'generate.py': lambda *flag: generate.main([str(pt), '--steps', '1', '--num_samples', '1', *flag]),
        'eval.py': lambda *flag: eval_cli.main([str(pt), '--data_root', str(tiny_dataset), '--judge', 'none',
                                                '--num_samples', '1', '--steps', '1', *flag]),
        'export': lambda *flag: export_main([str(pt), str(tmp_path / 'out'), *flag]),
    }  # fmt: skip


@pytest.mark.parametrize('place', PLACES)
@pytest.mark.parametrize('entry', ['generate.py', 'eval.py', 'export'])
def test_a_malicious_cli_argument_never_runs_without_the_flag(entry, place, tiny_dataset, tmp_path, capsys):
    pt, marker = plant(tmp_path, place)
    run = loaders(pt, tiny_dataset, tmp_path)[entry]
    assert run() == 2
    err = capsys.readouterr().err
    assert f'refusing to unpickle {pt} because it holds' in err and '--trust_checkpoint' in err, err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()
    # The payload is live: with the flag it runs (then the file is refused as no checkpoint of ours).
    assert run('--trust_checkpoint') == 2
    assert marker.exists()


@pytest.mark.parametrize('place', PLACES)
def test_a_malicious_load_path_is_refused_before_composer_sees_it(place, tiny_config, tmp_path):
    pt, marker = plant(tmp_path, place)
    with pytest.raises(
        ValueError, match=r'refusing to unpickle .* holds builtins.exec.* trust_checkpoint=true'
    ):
        train.validate(parse_config(dict(tiny_config, load_path=str(pt))))
    assert not marker.exists()
    missing = dict(tiny_config, load_path=str(pt.parent / 'nope.pt'))
    with pytest.raises(ValueError, match='load_path .*nope.pt not found'):
        train.validate(parse_config(missing))
    train.validate(parse_config(dict(tiny_config, load_path=str(pt), trust_checkpoint=True)))  # accepted


@pytest.mark.slow
@pytest.mark.parametrize('name', ['latest-rank0.pt', 'ep0-ba2-rank0.pt'])
@pytest.mark.parametrize('place', PLACES)
def test_a_malicious_checkpoint_autoresume_finds_never_runs(name, place, tiny_config, tmp_path):
    """The pointer autoresume follows, or a timestamped checkpoint it falls back to, planted in the
    save folder: Composer itself reads it, through the weights-only guard."""
    pt, marker = plant(tmp_path, place, name)
    cfg = dict(tiny_config, save_folder=str(pt.parent), autoresume=True)
    with pytest.raises(ValueError, match=f'refusing to unpickle .*{name} because it holds exec'):
        train.main(cfg)
    assert not marker.exists()


@pytest.mark.slow
def test_the_allowlist_holds_every_type_of_a_real_checkpoint(tiny_config, tmp_path):
    """A checkpoint train.py wrote (EMA, self-conditioning, time warp, RNG states) loads weights-only,
    from anywhere, by Composer's resume and by our loader."""
    cfg = dict(tiny_config, algorithms=dict(tiny_config['algorithms'], ema={'half_life': '2ba'}))
    train.main(cfg)
    pt = tmp_path / 'checkpoints' / 'latest-rank0.pt'
    assert trust.outside_allowlist(str(pt)) == []
    state = trust.load_checkpoint_file(str(pt), str(pt), trust=False)
    assert state['state']['timestamp'] and 'rng' in state
    pt.resolve().chmod(0o666)  # where it lies says nothing about what it holds
    assert generate.main([str(pt), '--steps', '1', '--num_samples', '1']) == 0
    resumed = train.main(dict(cfg, max_duration='6ba', autoresume=True), return_trainer=True)
    assert int(resumed.state.timestamp.batch) == 6


class Reducing:
    """Unpickling this calls `function(*args)`."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize('function, args, named', [
    (exec, ('1',), 'exec'),  # torch: "GLOBAL exec was not an allowed global"
    (os.system, ('true',), 'posix.system'),  # torch: "GLOBAL posix.system whose module is blocked"
    (eval, ('1',), 'eval'),
    (getattr, (os, 'getcwd'), 'getattr'),
    (torch.load, ('x.pt',), 'torch.serialization.load'),
    (pickle.loads, (b'.',), 'loads'),
])  # fmt: skip
def test_every_kind_of_code_in_a_pickle_is_refused_naming_it(function, args, named, tmp_path):
    """Whatever callable a pickle names and however torch words its refusal, it is refused as
    untrusted (never called, never reported as a damaged file)."""
    pt = tmp_path / 'evil.pt'
    try:
        torch.save({'state': Reducing(function, *args)}, pt)
    except TypeError:  # a module argument cannot be pickled: name the module's function instead
        torch.save({'state': Reducing(function, 'os', 'getcwd')}, pt)
    with pytest.raises(trust.UntrustedCheckpoint, match=f'because it holds .*{named}'):
        trust.load_checkpoint_file(str(pt), str(pt), trust=False)


@pytest.mark.parametrize(
    'content', [b'not a checkpoint\n', b'hi', b'\x80\x02}q\x00.', b'PK\x03\x04' + b'\x00' * 40]
)
def test_a_file_that_is_no_checkpoint_is_one_line(content, tmp_path, capsys):
    """Text, a stray pickle opcode stream, a broken zip: the unpickler raises many kinds (KeyError,
    EOFError, RuntimeError...), and each becomes the same one line."""
    pt = tmp_path / 'notes.pt'
    pt.write_bytes(content)
    assert generate.main([str(pt), '--steps', '1', '--num_samples', '1']) == 2
    err = capsys.readouterr().err
    assert 'notes.pt is not' in err and len(err.strip().splitlines()) == 1, err


def test_the_composer_guard_says_in_one_line_when_its_target_is_gone(monkeypatch, caplog):
    """A Composer without the loader the guard replaces: the guard stays off, named, and the run goes on."""
    import composer.utils.checkpoint as loader

    monkeypatch.delattr(loader, '_torch_load_with_validation')
    with pytest.raises(
        workarounds.Unpatchable, match='weights_only_composer_loads stays off: composer.utils.che'
    ):
        workarounds.weights_only_composer_loads(trust=False)
    with caplog.at_level('WARNING', logger='cdcd_composer.workarounds'):
        assert 'weights_only_composer_loads' in workarounds.apply_all(trust_checkpoint=False, on_cpu=False)
    assert any('weights_only_composer_loads stays off' in r.getMessage() for r in caplog.records)


def sharded_folder(tmp_path: Path, marker: Path, where: str) -> Path:
    """A sharded (DCP) checkpoint whose `.metadata`, or one of whose non-tensor entries, runs code."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / f'evil-{where}'
    entry = Payload(marker) if where == 'entry' else 1
    dcp.save({'state': {'model': {'w': torch.zeros(2)}, 'x': entry}}, checkpoint_id=str(folder), no_dist=True)
    if where == 'metadata':
        (folder / '.metadata').write_bytes(pickle.dumps(Payload(marker)))
    return folder


@pytest.mark.parametrize('where', ['metadata', 'entry'])
def test_a_malicious_sharded_checkpoint_never_runs_without_the_flag(where, tmp_path, capsys):
    marker = tmp_path / 'marker'
    folder = sharded_folder(tmp_path, marker, where)
    assert not marker.exists()  # saving it ran nothing
    assert generate.main([str(folder), '--steps', '1', '--num_samples', '1']) == 2
    err = capsys.readouterr().err
    assert 'refusing to unpickle' in err and 'exec' in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    assert generate.main([str(folder), '--steps', '1', '--num_samples', '1', '--trust_checkpoint']) == 2
    assert marker.exists()  # the payload is live


def test_a_folder_as_load_path_names_the_checkpoint_to_pass(tiny_config, tmp_path):
    run = tmp_path / 'old-run'
    run.mkdir()
    (run / 'ep0-ba4-rank0.pt').write_bytes(b'')
    cfg = dict(tiny_config, load_path=str(run), autoresume=False)
    with pytest.raises(ValueError, match=rf'load_path {run} is a folder, not a checkpoint .* {run}/ep0-ba4'):
        train.validate(parse_config(cfg))
