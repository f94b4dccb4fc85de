"""The Hugging Face export: a folder `transformers` loads without this package, sampling as generate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, imported_modules
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from shipped import shipped_yaml

from cdcd_composer.commands import export as export_command
from cdcd_composer.commands import generate
from cdcd_composer.commands.evaluate import main as eval_main
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.data.tokenization import byte_tokenizer, load_tokenizer, tokenizer_to_json
from cdcd_composer.export import write_export
from cdcd_composer.hf import standalone
from cdcd_composer.hf.configuration_cdcd import HF_FORMAT
from cdcd_composer.hf.modeling_cdcd import CHECKSUM_KEY, FORMAT_KEY, tensors_sha256

HELPER = Path(__file__).with_name('hf_standalone_generate.py')
TRAINED = {'batch': 7, 'sample': 224, 'token': 21504}
# Two requests, each run by generate.py on the export and by the HF model: unconditional Euler,
# and a prompt with the multistep solver (a different batch size, seed and temperature).
REQUESTS = (
    {'num_samples': 4, 'steps': 6, 'seed': 3, 'tau': 0.7},
    {
        'num_samples': 4,
        'steps': 5,
        'seed': 11,
        'tau': 1.0,
        'prompt': 'once upon a time',
        'solver': 'dpmpp_2m',
    },
)


@pytest.fixture(scope='module')
def demo_export(tiny_dataset, tmp_path_factory) -> Path:
    """cdcd-tiny's architecture (the demo's), untrained, with a non-uniform time warp, exported."""
    recipe = shipped_yaml('cdcd-tiny')
    metadata = DatasetMetadata.load(str(tiny_dataset))
    tokenizer = load_tokenizer(str(tiny_dataset / 'tokenizer'))
    torch.manual_seed(0)
    model = CDCDComposerModel(
        {**recipe['model'], 'vocab_size': metadata.vocab_size}, recipe['diffusion']['t_min'],
        recipe['diffusion']['t_max'], dataset=metadata, tokenizer=tokenizer_to_json(tokenizer),
        self_conditioning=recipe['algorithms']['self_conditioning']['p'],
    )  # fmt: skip
    for p in model.model.parameters():  # untrained weights that still make distinct samples
        p.data.normal_(0.0, 0.05)
    model.time_warp.masses = torch.softmax(torch.randn(100, dtype=torch.float64), 0)
    out = tmp_path_factory.mktemp('demo') / 'export'
    write_export(str(out), model.state_dict(), training=TRAINED)
    return out


def generate_py(export: Path, request: dict, out: Path) -> list[dict]:
    """generate.py's samples for `request`, from its --out JSON Lines."""
    argv = [str(export), '--num_samples', str(request['num_samples']), '--steps', str(request['steps'])]
    argv += ['--seed', str(request['seed']), '--tau', str(request['tau']), '--out', str(out)]
    argv += ['--prompt', request['prompt']] if 'prompt' in request else []
    argv += ['--solver', request['solver']] if 'solver' in request else []
    assert generate.main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return {**env, 'HF_HOME': str(tmp_path / 'hf_home'), 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}


@pytest.mark.slow
def test_the_hf_folder_loads_without_the_package_offline_and_samples_what_generate_py_samples(
    demo_export, tmp_path, capsys
):
    folder = tmp_path / 'cdcd-hf'
    assert export_command.main([str(demo_export), str(folder), '--format', 'hf']) == 0
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'configuration_cdcd.py', 'modeling_cdcd.py',
            'README.md'} <= set(os.listdir(folder))  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(HELPER), str(folder), *map(json.dumps, REQUESTS)],
        cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{')]
    header, results, leaked = lines[0], lines[1:-1], lines[-1]
    assert header == {'model_type': 'cdcd', 'vocab_size': len(load_tokenizer(str(folder)))}  # Auto* read it
    assert leaked == {'cdcd_composer_modules': []}
    assert len(results) == len(REQUESTS)
    for i, (request, hf) in enumerate(zip(REQUESTS, results)):
        rows = generate_py(demo_export, request, tmp_path / f'samples{i}.jsonl')
        assert hf['ids'] == [row['ids'] for row in rows], request  # bit-equal token ids
        assert hf['texts'] == [row['text'] for row in rows]
        assert len(set(map(tuple, hf['ids']))) > 1  # distinct samples, not one repeated
    prompt_ids = results[1]['ids'][0][:5]
    assert prompt_ids[0] == load_tokenizer(str(folder)).cls_token_id and len(set(prompt_ids)) == 5


@pytest.mark.slow  # spawns interpreters: a fresh import is the thing tested
def test_sampling_evaluating_and_exporting_an_export_import_no_composer(demo_export, tiny_dataset, tmp_path):
    """generate.py, eval.py and export.py load an export as the plain sampling model (`CDCDDiffusion`)."""
    commands = {
        'generate.py': [str(demo_export), '--num_samples', '1', '--steps', '2'],
        'eval.py': [str(demo_export), '--data_root', str(tiny_dataset), '--num_samples', '2', '--steps', '2',
                    '--judge', 'none', '--nll_samples', '0'],
        'export.py': [str(demo_export), str(tmp_path / 'hf'), '--format', 'hf'],
    }  # fmt: skip
    for script, args in commands.items():
        cmd = [sys.executable, '-X', 'importtime', str(REPO / script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = imported_modules(proc.stderr)
        assert 'torch' in imported and 'composer' not in imported and 'torchmetrics' not in imported, script
        # Only eval.py reads shards: the validation split, through Streaming, which wrote them.
        assert ('streaming' in imported) == (script == 'eval.py'), script


@pytest.fixture(scope='module')
def hf_folder(demo_export, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('hf') / 'cdcd-hf'
    assert export_command.main([str(demo_export), str(folder), '--format', 'hf']) == 0
    return folder


def test_config_weights_and_card_say_what_the_model_is(hf_folder, demo_export, tiny_dataset, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_folder, trust_remote_code=True)
    recipe = shipped_yaml('cdcd-tiny')
    assert config.auto_map['AutoModel'] == 'modeling_cdcd.CDCDModel'
    assert config.denoiser['d_model'] == recipe['model']['d_model'] and config.training == TRAINED
    assert (config.t_min, config.t_max, config.weights) == (1.0, recipe['diffusion']['t_max'], 'raw')
    exported = load_file(demo_export / 'model.safetensors')
    assert torch.equal(
        torch.tensor(config.time_warp_masses, dtype=torch.float64), exported['time_warp.masses']
    )
    with safe_open(hf_folder / 'model.safetensors', framework='pt') as f:
        metadata, names = f.metadata(), set(f.keys())
    assert metadata['format'] == 'pt' and metadata[FORMAT_KEY] == str(HF_FORMAT) == '2'
    weights = {k.removeprefix('model.'): v for k, v in exported.items() if k.startswith('model.')}
    assert names == {'denoiser.' + k for k in weights}
    assert metadata[CHECKSUM_KEY] == tensors_sha256({'denoiser.' + k: v for k, v in weights.items()})
    card = (hf_folder / 'README.md').read_text()
    assert '7 batches (224 sequences, 21,504 tokens)' in card and 'Not evaluated at export' in card
    assert 'AutoModel.from_pretrained' in card and 'library_name: transformers' in card
    # With an eval report the card carries its figures: CE against t and the likelihood bound.
    report = tmp_path / 'report.json'
    argv = [str(demo_export), '--data_root', str(tiny_dataset), '--judge', 'none', '--num_samples', '2']
    argv += [
        '--steps',
        '2',
        '--tau',
        '1.0',
        '--nll_samples',
        '2',
        '--nll_canvases',
        '4',
        '--out',
        str(report),
    ]
    assert eval_main(argv) == 0
    figures = json.loads(report.read_text())
    assert (
        export_command.main([str(demo_export), str(tmp_path / 'hf'), '--format', 'hf', '--eval', str(report)])
        == 0
    )
    card = (tmp_path / 'hf' / 'README.md').read_text()
    first_ce = next(iter(figures['cross_entropy_vs_t'].values()))
    assert f'{first_ce:.3f}' in card and 'NLL' in card and 'Not evaluated' not in card


def resign(folder: Path, change) -> None:
    """Changes the weights with `change(tensors)` and records the matching checksum (a consistent file)."""
    path = folder / 'model.safetensors'
    with safe_open(path, framework='pt') as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={**metadata, CHECKSUM_KEY: tensors_sha256(tensors)})


def _flip_a_weight_byte(folder: Path) -> None:
    data = bytearray((folder / 'model.safetensors').read_bytes())
    data[-3] ^= 0x40
    (folder / 'model.safetensors').write_bytes(bytes(data))


def _other_width(folder: Path) -> None:
    config = json.loads((folder / 'config.json').read_text())
    config['denoiser']['d_model'] *= 2
    (folder / 'config.json').write_text(json.dumps(config))


def _config_value(**values):
    """A damage that sets config.json's `values` (json.dumps writes NaN and Infinity as Python does)."""

    def change(folder: Path) -> None:
        config = json.loads((folder / 'config.json').read_text())
        for key, value in values.items():
            if key == 'masses':
                config['time_warp_masses'][0] = value
            else:
                config[key] = value
        (folder / 'config.json').write_text(json.dumps(config))

    return change


DAMAGES = {
    't_max infinite': (_config_value(t_max=float('inf')), 'must satisfy 0 < t_min < t_max < inf'),
    'warp mass NaN': (_config_value(masses=float('nan')), 'time_warp_masses must be finite'),
    'seq_len 0': (_config_value(seq_len=0), r'seq_len 0 must be an integer in \[2, 65536\]'),
    'seq_len not the data': (_config_value(seq_len=4096), 'is not the seq_len of the data'),
    'eos outside': (_config_value(eos_token_id=99999), 'eos_token_id 99999 must be an id of the'),
    'format 99': (_config_value(hf_format=99), 'hf_format 99 is not 2'),
    "another run's weights": (
        lambda f: resign(f, lambda t: t['denoiser.head.bias'].add_(0.5)),  # consistent with its own metadata
        'is not the weights config.json records',
    ),
    'swapped tokenizer': (lambda f: byte_tokenizer().save_pretrained(f), 'not the one config.json records'),
    'missing tokenizer': (lambda f: (f / 'tokenizer.json').unlink(), 'tokenizer.json missing'),
    'cut weights': (lambda f: (f / 'model.safetensors').write_bytes(b'\x10\x00'), 'no readable safetensors'),
    'flipped byte': (_flip_a_weight_byte, 'does not match its recorded checksum'),
    'other width': (_other_width, 'does not fit config.json'),
    'no denoiser': (
        lambda f: (f / 'config.json').write_text(
            json.dumps({**json.loads((f / 'config.json').read_text()), 'denoiser': {}})
        ),  # fmt: skip
        'holds no denoiser architecture',
    ),
    'nan weights': (lambda f: resign(f, lambda t: t['denoiser.head.bias'].fill_(float('nan'))), 'holds NaN'),
    'missing tensor': (
        lambda f: resign(f, lambda t: t.pop('denoiser.head.bias')),
        'does not fit config.json',
    ),
}


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_folder_is_refused_in_one_line(hf_folder, tmp_path, damage):
    import shutil

    from cdcd_composer.hf.modeling_cdcd import CDCDModel

    folder = tmp_path / 'damaged'
    shutil.copytree(hf_folder, folder)
    CDCDModel.from_pretrained(str(folder))  # intact: loads
    change, message = DAMAGES[damage]
    change(folder)
    with pytest.raises(ValueError, match=message) as refused:
        CDCDModel.from_pretrained(str(folder))
    assert '\n' not in str(refused.value) and 'export the model again' in str(refused.value)


def test_push_to_hub_uploads_the_folder_through_upload_folder(demo_export, tmp_path, monkeypatch, capsys):
    """Everything up to the network: the upload itself cannot run offline."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub, 'create_repo', lambda repo_id, **kw: calls.append(('create', repo_id, kw))
    )

    def upload_folder(**kwargs):
        calls.append(('upload', kwargs['repo_id'], kwargs))
        assert {'config.json', 'modeling_cdcd.py'} <= set(os.listdir(kwargs['folder_path']))

    monkeypatch.setattr(huggingface_hub, 'upload_folder', upload_folder)
    out = tmp_path / 'hf'
    argv = [str(demo_export), str(out), '--format', 'hf', '--push_to_hub', 'someone/cdcd-tiny', '--private']
    assert export_command.main(argv) == 0
    (_, repo, create), (_, repo_again, upload) = calls
    assert repo == repo_again == 'someone/cdcd-tiny' and create == {'private': True, 'exist_ok': True}
    assert upload['folder_path'] == str(out) and '.cdcd-owned' in upload['ignore_patterns']

    def unreachable(**kwargs):
        raise ConnectionError('Max retries exceeded with url: /api/repos/create\n(more)')

    monkeypatch.setattr(huggingface_hub, 'upload_folder', unreachable)
    assert export_command.main(argv) == 1  # failed while working: the same command can succeed later
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'the folder is written' in err and (out / 'model.safetensors').exists()


def test_the_hf_export_replaces_only_its_own_folders(demo_export, tmp_path, capsys):
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep me')
    assert export_command.main([str(demo_export), str(mine), '--format', 'hf']) == 2
    assert (mine / 'notes.txt').read_text() == 'keep me' and 'error:' in capsys.readouterr().err
    assert export_command.main([str(demo_export), str(tmp_path / 'hf'), '--format', 'hf']) == 0
    assert (
        export_command.main([str(demo_export), str(tmp_path / 'hf'), '--format', 'hf']) == 0
    )  # ours: replaced


@pytest.mark.parametrize(
    'source, message',
    [
        ('import scipy\n', 'imports scipy'),
        ('def inner():\n    from cdcd_composer.data import loaders\n', 'imports cdcd_composer'),
        ('from cdcd_composer.time_warping import TimeWarp\n', 'not a portable module'),
        ('def score():\n    pass\n', 'both define score'),
    ],
)
def test_the_generated_code_refuses_what_it_cannot_carry(monkeypatch, source, message):
    original = standalone._source
    monkeypatch.setattr(
        standalone, '_source', lambda m: original(m) + ('\n' + source if m == 'cdcd_composer.sampler' else '')
    )
    with pytest.raises(ValueError, match=message):
        standalone.modeling_source()


def test_the_generated_code_is_the_packages_code():
    import ast
    import inspect

    from cdcd_composer import model, sampler, warp_curve

    code = standalone.modeling_source()
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add('.' * node.level + (node.module or '').split('.')[0])
    assert imported - set(sys.stdlib_module_names) == {
        'torch',
        'transformers',
        'safetensors',
        '.configuration_cdcd',
    }
    for unit in (
        model.CDCDTransformer,
        sampler.sample,
        sampler._exponential_integrator,
        warp_curve.WarpCurve,
    ):
        assert inspect.getsource(unit) in code  # the package's own text, not a copy kept by hand


def test_a_bad_eval_report_is_refused_before_anything_is_written(demo_export, tmp_path, capsys):
    (tmp_path / 'notes.json').write_text('{"rows": []}')
    for report, message in (
        (tmp_path / 'missing.json', 'is unreadable'),
        (tmp_path / 'notes.json', 'not an eval.py report'),
    ):
        assert (
            export_command.main(
                [str(demo_export), str(tmp_path / 'hf'), '--format', 'hf', '--eval', str(report)]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert message in err and '\n' not in err and not (tmp_path / 'hf').exists()


def test_fine_tuned_weights_saved_with_save_pretrained_load_again(hf_folder, tmp_path):
    """save_pretrained records the SHA-256 of the weights it saves; tokenizer and code travel alongside."""
    import shutil

    from cdcd_composer.hf.modeling_cdcd import CDCDModel

    model = CDCDModel.from_pretrained(str(hf_folder))
    with torch.no_grad():
        model.denoiser.head.bias.add_(0.25)  # a fine-tuning step
    out = tmp_path / 'tuned'
    model.save_pretrained(str(out))
    for name in set(os.listdir(hf_folder)) - set(os.listdir(out)):  # tokenizer, code, card
        shutil.copy(hf_folder / name, out / name)
    again = CDCDModel.from_pretrained(str(out))
    torch.testing.assert_close(again.denoiser.head.bias, model.denoiser.head.bias)
