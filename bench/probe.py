"""Bad and hostile inputs through every entry point, as a new user would type them: one table.

    python bench/probe.py                 # about 50 inputs, a few minutes on 2 cores

Each row runs one command in a fresh process (like a user) and classifies what came back:
`one-line error` (exit 2, a single `error:` line naming `mention`), `handled` (exit 0 where
the input is reasonable), `traceback`, `unclear` (an error that does not name the key or file)
or `silent` (exit 0 on an input that should have been refused). It needs the demo corpus
(`make demo`'s `data/synthetic`) and writes only under a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def train(*overrides: str, yaml: str = 'yamls/cdcd-tiny.yaml') -> list[str]:
    """The train.py command line."""
    return [PY, 'train.py', yaml, *overrides]


def config_probes(data: Path, out: Path) -> list[tuple[str, str, list[str], str]]:
    """(class, input, command, what the error must mention) for config values."""
    base = [
        f'variables.data_root={data}',
        f'save_folder={out}/ckpt',
        'max_duration=2ba',
        f'loggers.file.filename={out}/log.txt',
        'callbacks.export_weights.folder=' + str(out / 'export'),
    ]
    rows = [
        ('model.n_heads=0', 'n_heads'),
        ('device_train_microbatch_size=-2', 'device_train_microbatch_size'),
        ('device_train_microbatch_size=0', 'device_train_microbatch_size'),
        ('model.mlp_ratio=-1', 'mlp_ratio'),
        ('model.mlp_ratio=nan', 'mlp_ratio'),
        ('model.embed_init_std=-1', 'embed_init_std'),
        ('optimizer.betas=[0.9]', 'betas'),
        ('optimizer.weight_decay=-1', 'weight_decay'),
        ('data.shuffle_algo=bogus', 'shuffle_algo'),
        ('algorithms.gradient_clipping.clipping_type=bogus', 'clipping_type'),
        ('device=tpu', 'device'),
        (f'save_folder={out}/{{nope}}', 'save_folder'),
        (f'loggers.file.filename={out}', 'file'),
        ('eval_interval=0ba', 'eval_interval'),
        ('save_interval=0ba', 'save_interval'),
        ('callbacks.time_warp_refit.interval=0ba', 'interval'),
        ('masking.prefix=nan', 'prefix'),
        ('dist_timeout=-1', 'dist_timeout'),
        ('data.num_canonical_nodes=0', 'num_canonical_nodes'),
        ('eval_interval=abc', 'eval_interval'),
        ('loggers.file=[a,b]', 'loggers.file'),
    ]
    probes = [('config value', o, train(*base, o), key) for o, key in rows]
    probes.append(
        ('config value', 'max_duration=0ba', train(*base[:2], *base[3:], 'max_duration=0ba'), 'max_duration')
    )
    scalar, listed = out / 'scalar.yaml', out / 'list.yaml'
    scalar.write_text('42\n')
    listed.write_text('- a\n- b\n')
    probes.append(('config value', 'a YAML holding a scalar', train(yaml=str(scalar)), 'scalar.yaml'))
    probes.append(('config value', 'a YAML holding a list', train(yaml=str(listed)), 'list.yaml'))
    return probes


def dataset_probes(data: Path, out: Path) -> list[tuple[str, str, list[str], str]]:
    """Damaged copies of the corpus, each trained on."""
    probes = []

    def damaged(name: str, change) -> Path:
        root = out / f'data-{len(probes)}'
        shutil.copytree(data, root)
        change(root)
        probes.append(
            (
                'on-disk format',
                name,
                train(
                    f'variables.data_root={root}',
                    f'save_folder={out}/c{len(probes)}',
                    'max_duration=2ba',
                    f'loggers.file.filename={out}/l.txt',
                ),
                'index.json' if 'index' in name else 'cdcd_dataset.json',
            )
        )
        return root

    meta = json.loads((data / 'cdcd_dataset.json').read_text())
    damaged('index.json is a list', lambda r: (r / 'train' / 'index.json').write_text('[]'))
    damaged('index.json lacks shards', lambda r: (r / 'train' / 'index.json').write_text('{"version": 2}'))
    damaged('index.json unreadable', lambda r: (r / 'train' / 'index.json').write_bytes(b'\xff\xfe{'))
    damaged(
        'cdcd_dataset.json lacks seq_len',
        lambda r: (r / 'cdcd_dataset.json').write_text(
            json.dumps({k: v for k, v in meta.items() if k != 'seq_len'})
        ),
    )
    damaged(
        'cdcd_dataset.json states another seq_len',
        lambda r: (r / 'cdcd_dataset.json').write_text(json.dumps({**meta, 'seq_len': 64})),
    )
    damaged(
        'cdcd_dataset.json states a wrong vocabulary',
        lambda r: (r / 'cdcd_dataset.json').write_text(json.dumps({**meta, 'vocab_size': 3})),
    )
    return probes


def export_probes(export: Path, out: Path) -> list[tuple[str, str, list[str], str]]:
    """Damaged copies of an export, each sampled with generate.py."""
    from safetensors.torch import load_file, save_file

    from cdcd_composer.export import file_sha256

    probes = []

    def damaged(name: str, change) -> None:
        root = out / f'export-{len(probes)}'
        shutil.copytree(export, root)
        change(root)
        probes.append(
            (
                'on-disk format',
                name,
                [PY, 'generate.py', str(root), '--steps', '2', '--num_samples', '1'],
                str(root),
            )
        )

    def tensors(change):
        def apply(root: Path) -> None:
            state = load_file(root / 'model.safetensors')
            change(state)
            save_file(state, root / 'model.safetensors')
            config = json.loads((root / 'cdcd_config.json').read_text())
            config['weights_sha256'] = file_sha256(str(root / 'model.safetensors'))
            (root / 'cdcd_config.json').write_text(json.dumps(config))

        return apply

    def spec(change):
        def apply(root: Path) -> None:
            config = json.loads((root / 'cdcd_config.json').read_text())
            blob = json.loads(config['spec'])
            change(blob)
            (root / 'cdcd_config.json').write_text(json.dumps({**config, 'spec': json.dumps(blob)}))

        return apply

    damaged('export spec of another width', spec(lambda b: b['model'].update(d_model=256)))
    damaged(
        'export spec without a tokenizer',
        spec(lambda b: b.update(tokenizer={'tokenizer': '{}', 'special_tokens': {}})),
    )
    damaged('export missing a tensor', tensors(lambda s: s.pop('model.head.bias')))
    damaged('export with NaN weights', tensors(lambda s: s['model.head.bias'].fill_(float('nan'))))
    damaged('export header broken', lambda r: (r / 'model.safetensors').write_bytes(b'\x10\x00\x00'))
    damaged('export config not JSON', lambda r: (r / 'cdcd_config.json').write_text('{'))
    return probes


def cli_probes(export: Path, data: Path, out: Path) -> list[tuple[str, str, list[str], str]]:
    """Command-line values of generate.py, eval.py, export.py and the converter."""
    gen = [PY, 'generate.py', str(export)]
    ev = [PY, 'eval.py', str(export), '--data_root', str(data), '--judge', 'none']
    return [
        ('machine limit', 'generate --seed 2**70', [*gen, '--seed', str(2**70)], '--seed'),
        ('machine limit', 'generate --steps 1e9', [*gen, '--steps', '1000000000'], 'steps'),
        ('machine limit', 'generate --out /proc/x', [*gen, '--out', '/proc/x', '--steps', '2'], '/proc/x'),
        (
            'machine limit',
            'generate --out /dev/full',
            [*gen, '--out', '/dev/full', '--steps', '2', '--num_samples', '1'],
            '/dev/full',
        ),
        ('machine limit', 'eval --num_samples 1e8', [*ev, '--num_samples', '100000000'], '--num_samples'),
        ('machine limit', 'eval --out on a bad path', [*ev, '--out', '/proc/x/r.json'], '/proc/x'),
        (
            'silent garbage',
            'generate --time_shift inf',
            [*gen, '--time_shift', 'inf', '--steps', '2'],
            'time_shift',
        ),
        ('silent garbage', 'generate --tau nan', [*gen, '--tau', 'nan', '--steps', '2'], 'tau'),
        (
            'ownership',
            'convert into a folder with my manifest.json',
            [
                PY,
                'data_prep/convert_tinystories.py',
                '--source',
                'synthetic',
                '--num_train',
                '8',
                '--num_val',
                '4',
                '--out_root',
                str(out / 'mine'),
                '--overwrite',
            ],
            'mine',
        ),
        (
            'ownership',
            'export into a folder with my files',
            [PY, 'export.py', str(export), str(out / 'mine')],
            'mine',
        ),
        (
            'ownership',
            'hf export into a folder with my files',
            [PY, 'export.py', str(export), str(out / 'mine'), '--format', 'hf'],
            'mine',
        ),
        (
            'handled',
            'generate with a prompt',
            [*gen, '--prompt', 'once upon a time', '--steps', '2', '--num_samples', '1'],
            '',
        ),
        (
            'handled',
            'convert --size_limit 1kb',
            [
                PY,
                'data_prep/convert_tinystories.py',
                '--source',
                'synthetic',
                '--num_train',
                '8',
                '--num_val',
                '4',
                '--out_root',
                str(out / 'small'),
                '--size_limit',
                '1kb',
                '--train_tokenizer',
                '256',
            ],
            '',
        ),
        (
            'config value',
            'convert --size_limit 0',
            [
                PY,
                'data_prep/convert_tinystories.py',
                '--source',
                'synthetic',
                '--num_train',
                '8',
                '--out_root',
                str(out / 'z'),
                '--size_limit',
                '0',
            ],
            'size_limit',
        ),
    ]


def classify(run: subprocess.CompletedProcess, expect_ok: bool, mention: str) -> str:
    """The outcome's class (see the module docstring)."""
    if 'Traceback (most recent call last)' in run.stderr:
        return 'traceback'
    if run.returncode == 0:
        return 'handled' if expect_ok else 'silent'
    errors = [line for line in run.stderr.splitlines() if line.startswith('error:') or ': error:' in line]
    if len(errors) == 1 and mention.lower() in errors[0].lower():
        return 'one-line error'
    return 'unclear'


def main() -> None:
    """Runs every probe and prints the table, then the counts per class and outcome."""
    data, export = REPO / 'data' / 'synthetic', REPO / 'runs' / 'cdcd-tiny' / 'export'
    if not (data / 'cdcd_dataset.json').exists() or not (export / 'cdcd_config.json').exists():
        sys.exit(
            "error: bench/probe.py needs make demo's data/synthetic and runs/cdcd-tiny/export; run make demo"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / 'mine').mkdir()
        (out / 'mine' / 'manifest.json').write_text('{"mine": true}')
        (out / 'mine' / 'cdcd_config.json').write_text('{"mine": true}')
        probes = [
            *config_probes(data, out),
            *dataset_probes(data, out),
            *export_probes(export, out),
            *cli_probes(export, data, out),
        ]
        counts: Counter = Counter()
        print(f'{"class":<16}{"outcome":<16}input')
        for kind, name, command, mention in probes:
            env = {**os.environ, 'OMP_NUM_THREADS': '1'}
            try:
                run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
                outcome = classify(run, kind == 'handled', mention)
            except subprocess.TimeoutExpired:
                outcome = 'silent (ran on)'
            counts[kind, outcome] += 1
            print(f'{kind:<16}{outcome:<16}{name}', flush=True)
        assert (out / 'mine' / 'manifest.json').read_text() == '{"mine": true}', 'a user file was replaced'
        print('\nuser files kept: yes')
        for (kind, outcome), n in sorted(counts.items()):
            print(f'{kind:<16}{outcome:<16}{n}')


if __name__ == '__main__':
    main()
