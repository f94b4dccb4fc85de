"""An output never eats an input: every writer checks its path against the command's inputs, writes
only regular files or new paths, and stages what it writes."""

import os

import pytest

from cdcd_composer.commands import export as export_command
from cdcd_composer.outputs import check_output_file, write_output_file


@pytest.fixture
def export_dir(tmp_path):
    folder = tmp_path / 'export'
    folder.mkdir()
    for name in ('model.safetensors', 'config.json'):
        (folder / name).write_text('weights' if name.endswith('safetensors') else '{}')
    return folder


@pytest.mark.parametrize('name', ['model.safetensors', 'config.json', '.'])
def test_an_output_inside_an_input_is_refused_in_one_line(export_dir, name):
    out = str(export_dir / name)
    with pytest.raises(ValueError, match='would write over .* an input of this command') as error:
        check_output_file(out, inputs=[str(export_dir)])
    assert '\n' not in str(error.value)
    assert (export_dir / 'model.safetensors').read_text() == 'weights'


def test_an_output_through_a_symlink_to_an_input_is_refused(export_dir, tmp_path):
    link = tmp_path / 'samples.jsonl'
    link.symlink_to(export_dir / 'config.json')
    with pytest.raises(ValueError, match='would write over'):
        check_output_file(str(link), inputs=[str(export_dir)])


@pytest.mark.parametrize('marker', ['.cdcd-owned', '.cdcd-lock'])
def test_an_output_in_a_folder_we_manage_is_refused_even_when_no_input(tmp_path, marker):
    run = tmp_path / 'checkpoints'  # a run's save folder, sampled here from its export elsewhere
    run.mkdir()
    (run / marker).write_text('')
    (run / 'latest-rank0.pt').write_bytes(b'PK\x03\x04' + bytes(64))
    with pytest.raises(ValueError, match=f'lies in {run}, a folder cdcd-composer manages'):
        check_output_file(str(run / 'latest-rank0.pt'), inputs=[str(tmp_path / 'export')])
    with pytest.raises(ValueError, match='a folder cdcd-composer manages'):
        check_output_file(str(run / 'samples.jsonl'))


def test_a_binary_file_is_never_replaced_by_samples(tmp_path):
    (tmp_path / 'weights.pt').write_bytes(b'PK\x03\x04' + bytes(64))
    with pytest.raises(ValueError, match='weights.pt exists and is not a text file'):
        check_output_file(str(tmp_path / 'weights.pt'))
    (tmp_path / 'old_samples.jsonl').write_text('{"text": "once"}\n')
    check_output_file(str(tmp_path / 'old_samples.jsonl'))  # earlier samples: replaced


def test_a_fifo_is_no_output(tmp_path):
    fifo = tmp_path / 'pipe'
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match='is not a regular file'):
        check_output_file(str(fifo))


def test_a_failed_write_leaves_the_old_file_and_no_staging(tmp_path):
    out = tmp_path / 'report.json'
    out.write_text('the old report')

    def fail(f):
        f.write('half')
        raise OSError(28, 'No space left on device')

    with pytest.raises(ValueError, match='writing failed .* nothing was written'):
        write_output_file(str(out), fail)
    assert out.read_text() == 'the old report' and os.listdir(tmp_path) == ['report.json']
    write_output_file(str(out), lambda f: f.write('new'))
    assert out.read_text() == 'new' and os.listdir(tmp_path) == ['report.json']


@pytest.mark.parametrize('where', ['same', 'inside', 'holds'])
def test_export_refuses_an_out_dir_that_is_its_input(export_dir, tmp_path, where, capsys):
    out = {'same': export_dir, 'inside': export_dir / 'hf', 'holds': tmp_path}[where]
    assert export_command.main([str(export_dir), str(out), '--format', 'hf']) != 0
    assert 'would write over' in capsys.readouterr().err
    assert sorted(os.listdir(export_dir)) == ['config.json', 'model.safetensors']


def test_staging_a_dead_writer_left_is_removed_and_a_live_ones_kept(tmp_path):
    """A SIGKILLed export leaves `.tmp-export-*`: the next export of the same folder removes it when
    its marker's writer is gone, and never touches a live writer's staging or the user's files."""
    import json
    import subprocess

    from cdcd_composer.storage import OWNER_MARKER, Folder

    gone = subprocess.Popen(['true'])
    gone.wait()
    live = subprocess.Popen(['sleep', '600'])
    try:
        for name, pid in (('.tmp-export-dead', gone.pid), ('.tmp-export-live', live.pid)):
            (tmp_path / name).mkdir()
            (tmp_path / name / OWNER_MARKER).write_text(json.dumps({'writer': 'cdcd-composer', 'pid': pid}))
            (tmp_path / name / 'model.safetensors').write_bytes(b'x' * 1000)
        (tmp_path / '.tmp-export-users').mkdir()  # no marker: not ours
        with Folder(str(tmp_path)).staged_directory('export') as staging:
            open(os.path.join(staging, 'config.json'), 'w').close()
        assert sorted(os.listdir(tmp_path)) == ['.tmp-export-live', '.tmp-export-users', 'export']
    finally:
        live.kill()
        live.wait()
