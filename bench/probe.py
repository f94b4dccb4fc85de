"""Bad and hostile inputs at every entry point, each run and classified: `python bench/probe.py`.

Builds its own fixtures with the tree under test (a synthetic dataset, a 4-batch tiny run, its
checkpoint and export), then runs each case's entry point (`train.py`, `generate.py`, `eval.py`,
`export.py`, `data_prep/convert_tinystories.py`) as `__main__` in a forked child of one process
that has already imported torch, Composer, Streaming and transformers, so a case costs its own
work, not 12 s of imports. Each outcome is one of:

| class | meaning |
|---|---|
| code execution | a planted pickle ran its payload |
| data loss | a file the user owned was deleted or changed |
| traceback | a Python traceback reached the user |
| silent | a bad input was accepted (exit 0), or the run hung past its limit |
| unclear | refused, but the last line does not name the thing (the case's key, path or flag) |
| one-line error | refused, the last line names it |
| handled | a reasonable input did what it should |

Where the machine lets it make a mount namespace (`unshare`), the probe reruns itself in one with a
32 MB tmpfs at {w}/full, and the full-disk cases write to that real, nearly full disk.

`--tree DIR` probes another checkout (a `git worktree` of an older commit) with the same cases,
so before/after counts come from one script. Prints a table per class and entry point, and with
`--verbose` one row per case. This is a probe, not a test: the tests pin each class.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# Lines that are not the program's answer: indented traceback/warning bodies, log records,
# Python warnings, progress bars.
NOISE = re.compile(r'^\s|^\d{4}-\d\d-\d\d |^\S+:\d+: \w*Warning|^sampling:|^\w+ing: +\d+%')
CLASSES = ('code execution', 'data loss', 'traceback', 'silent', 'unclear', 'one-line error', 'handled')
SCRIPTS = {
    'train': 'train.py', 'generate': 'generate.py', 'eval': 'eval.py', 'export': 'export.py',
    'convert': 'data_prep/convert_tinystories.py',
}  # fmt: skip
TINY = ['model.d_embed=16', 'model.d_model=32', 'model.n_layers=1', 'model.n_heads=2', 'model.n_fourier=8',
        'model.d_time=16']  # fmt: skip


@dataclasses.dataclass
class Case:
    """One input at one entry point.

    Attributes:
        entry: A key of SCRIPTS.
        args: Its command line (paths may hold `{w}`, the work folder, and `{tree}`).
        names: What the error's last line must contain (case-insensitive), or None when the input is
            reasonable and must succeed.
        setup: Prepares the work folder (plants files) before the run.
        protect: Files (relative to the work folder) that must be unchanged afterwards.
        limit: Seconds before the run counts as hung.
        announces: For a long job that may run on: what it must have printed by its limit (its
            plan, its time), for a run still going then to count as handled, not hung.
        label: The group it belongs to (the class of fault, or what it exercises), for --only.
    """

    entry: str
    args: list[str]
    names: list[str] | None
    setup: Callable[[Path], None] | None = None
    protect: list[str] = dataclasses.field(default_factory=list)
    limit: float = 240.0
    label: str = ''
    announces: list[str] | None = None


class Payload:
    """A pickle that runs code when loaded: it creates the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def plant_pickle(path: Path, marker: Path, owner: int | None = None, world_writable: bool = False) -> None:
    """A malicious checkpoint at `path`: torch.save of a state holding the payload."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state': {'model': {}, 'x': Payload(str(marker))}}, path)
    if world_writable:
        path.parent.chmod(0o777)
    if owner is not None:
        os.chown(path, owner, owner)


def copy_tree(source: Path, dest: Path) -> None:
    """A copy of a fixture folder, replacing any earlier one."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, symlinks=True)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Rewrites a JSON file with `change` applied (its return value, if not None, replaces it)."""
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def user_files(folder: Path, *names: str) -> None:
    """A folder of the user's own, holding `names` with the user's content."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text('{"mine": "the user wrote this"}')


def train_args(*extra: str, yaml: str = 'cdcd-tiny') -> list[str]:
    """`train.py` on a shipped YAML shrunk in size, writing under {w}/case, plus `extra`."""
    return [
        f'{{tree}}/yamls/{yaml}.yaml', 'variables.data_root={w}/data', 'max_duration=2ba',
        'global_train_batch_size=4', 'device_eval_batch_size=8', 'eval_interval=2ba',
        'eval_subset_num_batches=1', 'progress_bar=false', 'save_folder={w}/case/ckpt', 'save_interval=2ba',
        'loggers.file.filename={w}/case/log.txt', 'scheduler.t_warmup=1ba',
        'callbacks.time_warp_refit.plot_folder={w}/case', 'callbacks.export_weights.folder={w}/case/export',
        'callbacks.training_samples.interval=2ba', 'callbacks.training_samples.steps=2', *TINY, *extra,
    ]  # fmt: skip


FULL = 'full'  # a 32 MB tmpfs at {w}/full when the probe runs in a mount namespace of its own (`main`)
FIXTURES = ('data', 'data300', 'data48', 'run', 'logs', FULL)


def leave_free(w: Path, n_bytes: int) -> None:
    """Empties the small disk at {w}/full and fills it until `n_bytes` are free."""
    full = w / FULL
    for path in full.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (full / 'filler').write_bytes(bytes(max(0, shutil.disk_usage(full).free - n_bytes)))


def checkpoint_size(w: Path) -> int:
    """The bytes of the fixture run's checkpoint."""
    return (w / 'run' / 'ckpt' / 'latest-rank0.pt').resolve().stat().st_size


def fresh_case_folder(w: Path) -> None:
    """Everything but the fixtures removed, and an empty `case` folder for the run's outputs."""
    for path in w.iterdir():
        if path.name not in FIXTURES:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    (w / 'case').mkdir()


# The command lines the sampling, resume, converter and output cases start from.
EVAL_ARGS = ['{w}/run/export', '--data_root', '{w}/data', '--judge', 'none', '--steps', '2', '--num_samples', '2',
             '--nll_samples', '0']  # fmt: skip
CONVERT_ARGS = ['--source', 'synthetic', '--out_root', '{w}/case/data', '--num_train', '64', '--num_val', '16',
                '--train_tokenizer', '300']  # fmt: skip


def code_execution_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Code execution: a malicious pickle at every path a checkpoint is read from."""
    c: list[Case] = []

    def evil(rel: str, **kw) -> Callable[[Path], None]:
        return lambda w: plant_pickle(w / rel, w / 'PWNED', **kw)

    for entry, args in (('generate', ['{w}/mine/evil.pt', '--num_samples', '1', '--steps', '2']),
                        ('eval', ['{w}/mine/evil.pt', '--data_root', '{w}/data', '--judge', 'none']),
                        ('export', ['{w}/mine/evil.pt', '{w}/case/out'])):  # fmt: skip
        c.append(Case(entry, args, ['trust'], evil('mine/evil.pt'), label='code execution'))
    for where, kw in (('mine', {}), ('shared', {'world_writable': True}), ('other', {'owner': 65534})):
        c.append(Case('train', train_args(f'load_path={{w}}/{where}/evil.pt', 'autoresume=false'), ['trust'],
                      evil(f'{where}/evil.pt', **kw), label='code execution'))  # fmt: skip
        for name in ('latest-rank0.pt', 'ep0-ba2-rank0.pt'):
            setup = evil(f'case/ckpt/{name}', **kw)
            c.append(Case('train', train_args(), ['trust'], setup, label='code execution'))
    c.append(Case('generate', ['{w}/other/evil.pt'], ['trust'], evil('other/evil.pt', owner=65534),
                  label='code execution'))  # fmt: skip
    return c


def data_loss_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Data loss: a folder the user made, holding files with our names, is never replaced."""
    c: list[Case] = []
    for name in ('manifest.json', 'cdcd_dataset.json', 'cdcd_config.json'):
        for overwrite in ([], ['--overwrite']):
            c.append(Case('convert', ['--source', 'synthetic', '--out_root', '{w}/userdir', '--num_train', '64',
                                      '--num_val', '16', '--train_tokenizer', '300', *overwrite],
                          ['userdir'], lambda w, n=name: user_files(w / 'userdir', n),
                          protect=[f'userdir/{name}'], label='data loss'))  # fmt: skip
    c.append(Case('export', ['{w}/run/ckpt/latest-rank0.pt', '{w}/userdir'], ['userdir'],
                  lambda w: user_files(w / 'userdir', 'cdcd_config.json', 'model.safetensors'),
                  protect=['userdir/cdcd_config.json', 'userdir/model.safetensors'], label='data loss'))  # fmt: skip
    keep_one = train_args('save_folder={w}/userdir', 'save_num_checkpoints_to_keep=1', 'save_interval=1ba')
    c.append(Case('train', keep_one, None, lambda w: user_files(w / 'userdir', 'notes.txt', 'mine.json'),
                  protect=['userdir/notes.txt', 'userdir/mine.json'], label='data loss'))  # fmt: skip
    c.append(Case('train', keep_one, ['ep0-ba1-rank0.pt'], lambda w: user_files(w / 'userdir', 'ep0-ba1-rank0.pt'),
                  protect=['userdir/ep0-ba1-rank0.pt'], label='data loss'))  # fmt: skip
    c.append(Case('train', train_args('callbacks.export_weights.folder={w}/userdir'), ['userdir'],
                  lambda w: user_files(w / 'userdir', 'cdcd_config.json', 'notes.txt'),
                  protect=['userdir/cdcd_config.json', 'userdir/notes.txt'], label='data loss'))  # fmt: skip
    return c


def config_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Config values that crashed with a traceback, were silently accepted, or were unclear."""
    c: list[Case] = []
    for override, names in (
        ('model.n_heads=0', ['n_heads']), ('device_train_microbatch_size=-2', ['device_train_microbatch_size']),
        ('model.mlp_ratio=-1', ['mlp_ratio']), ('model.embed_init_std=-0.1', ['embed_init_std']),
        ('optimizer.betas=[0.9]', ['betas']), ('max_duration=0ba', ['max_duration']),
        ('data.shuffle_algo=bogus', ['shuffle_algo']),
        ('algorithms.gradient_clipping.clipping_type=bogus', ['clipping_type']), ('device=tpu', ['device']),
        ('save_folder={w}/case/{{nope}}', ['save_folder']), ('loggers.file.filename={w}', ['filename']),
        ('device_train_microbatch_size=0', ['device_train_microbatch_size']),
        ('eval_interval=0ba', ['eval_interval']), ('save_interval=0ba', ['save_interval']),
        ('callbacks.time_warp_refit.interval=0ba', ['interval']),
        ('optimizer.weight_decay=-1', ['weight_decay']), ('dist_timeout=-1', ['dist_timeout']),
        ('data.num_canonical_nodes=0', ['num_canonical_nodes']), ('loggers.file=[a,b]', ['loggers.file']),
        ('model.mlp_ratio=nan', ['mlp_ratio']), ('max_duration=abc', ['max_duration']),
        ('optimizer.lr=-1', ['lr']), ('optimizer.lr=inf', ['lr']), ('seed=-1', ['seed']),
        ('global_train_batch_size=0', ['global_train_batch_size']), ('model.n_layers=0', ['n_layers']),
        ('diffusion.t_min=0', ['t_min']), ('diffusion.t_max=0.5', ['t_max']),
        ('algorithms.self_conditioning.p=1.5', ['p']), ('nonsense_key=1', ['nonsense_key']),
        ('model.d_model=33', ['d_model']), ('precision=fp64', ['precision']),
        ('callbacks.time_warp_refit.n_bins=0', ['n_bins']), ('eval_subset_num_batches=-3', ['eval_subset_num_batches']),
        ('scheduler.name=bogus', ['bogus']), ('optimizer.name=bogus', ['bogus']),
    ):  # fmt: skip
        c.append(Case('train', train_args(override), names, label='config'))
    c.append(Case('train', train_args('masking.prefix=nan', yaml='cdcd-5m'), ['prefix'], label='config'))
    c.append(Case('train', train_args('masking.prefix=-1', yaml='cdcd-5m'), ['prefix'], label='config'))
    for text, names in (
        ('42\n', ['scalar.yaml']),
        ('- a\n- b\n', ['scalar.yaml']),
        ('a: [\n', ['scalar.yaml']),
    ):
        c.append(Case('train', ['{w}/scalar.yaml'], names,
                      lambda w, t=text: (w / 'scalar.yaml').write_text(t), label='config'))  # fmt: skip
    c.append(Case('train', ['{w}/missing.yaml'], ['missing.yaml'], label='config'))
    c.append(Case('train', ['{w}'], ['is a directory'], label='config'))
    c.append(Case('train', train_args('variables.data_root={w}/nodata'), ['nodata'], label='config'))
    return c


def formats_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """On-disk formats: damaged dataset files."""
    c: list[Case] = []

    def damaged(change: Callable[[Path], None]) -> Callable[[Path], None]:
        def setup(w: Path) -> None:
            copy_tree(w / 'data', w / 'bad')
            change(w / 'bad')

        return setup

    for change, names in (
        (lambda d: (d / 'train' / 'index.json').write_text('[1, 2]'), ['index.json']),
        (lambda d: (d / 'train' / 'index.json').write_text('{"version": 2}'), ['index.json']),
        (lambda d: (d / 'train' / 'index.json').write_text('{not json'), ['index.json']),
        (lambda d: ((d / 'train' / 'index.json').unlink(), (d / 'train' / 'index.json').mkdir()), ['index.json']),
        (lambda d: edit_json(d / 'cdcd_dataset.json', lambda m: m.pop('seq_len')), ['cdcd_dataset.json']),
        (lambda d: edit_json(d / 'cdcd_dataset.json', lambda m: m.update(seq_len=48)), ['cdcd_dataset.json']),
        (lambda d: edit_json(d / 'cdcd_dataset.json', lambda m: m.update(vocab_size=7)), ['cdcd_dataset.json']),
        (lambda d: (d / 'cdcd_dataset.json').write_text('[]'), ['cdcd_dataset.json']),
        (lambda d: next((d / 'train').glob('shard.*.mds*')).write_bytes(b'garbage' * 100), ['shard']),
    ):  # fmt: skip
        c.append(Case('train', train_args('variables.data_root={w}/bad'), names, damaged(change),
                      label='format'))  # fmt: skip
    return c


def exports_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Exports: damaged, then sampled."""
    c: list[Case] = []

    def damaged_export(change: Callable[[Path], None]) -> Callable[[Path], None]:
        def setup(w: Path) -> None:
            copy_tree(w / 'run' / 'export', w / 'badexport')
            change(w / 'badexport')

        return setup

    def rewrite_weights(folder: Path, change: Callable[[dict], None]) -> None:
        """The export's tensors changed and saved, with its checksum updated.

        A consistent export of bad weights (a diverged run), not a damaged file.
        """
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / 'model.safetensors')
        change(tensors)
        save_file(tensors, folder / 'model.safetensors', metadata={'format': 'pt'})
        digest = hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest()
        edit_json(
            folder / 'cdcd_config.json',
            lambda c: c.update(weights_sha256=digest) if 'weights_sha256' in c else None,
        )

    def nan_weights(folder: Path) -> None:
        def fill(tensors: dict) -> None:
            first = sorted(tensors)[0]
            tensors[first] = tensors[first].clone().fill_(float('nan'))

        rewrite_weights(folder, fill)

    def drop_tensor(folder: Path) -> None:
        rewrite_weights(
            folder, lambda tensors: tensors.pop(next(k for k in sorted(tensors) if 'weight' in k))
        )

    def truncate(folder: Path) -> None:
        data = (folder / 'model.safetensors').read_bytes()
        (folder / 'model.safetensors').write_bytes(data[: len(data) // 2])

    def config_json(folder: Path) -> Path:
        return next(p for p in folder.iterdir() if p.suffix == '.json' and 'config' in p.name)

    for change, names in (
        (nan_weights, ['nan']), (drop_tensor, ['spec']), (truncate, ['model.safetensors']),
        (lambda d: (d / 'model.safetensors').write_bytes(b'\xff' * 64), ['model.safetensors']),
        (lambda d: config_json(d).write_text('{}'), ['config']),
        (lambda d: config_json(d).write_text('{broken'), ['config']),
        (lambda d: (d / 'model.safetensors').unlink(), ['model.safetensors']),
    ):  # fmt: skip
        c.append(Case('generate', ['{w}/badexport', '--num_samples', '2', '--steps', '2'], names,
                      damaged_export(change), label='format'))  # fmt: skip
    c.append(
        Case('export', ['{w}/badexport', '{w}/case/re'], ['nan'], damaged_export(nan_weights), label='format')
    )
    return c


def sampling_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Sampling and evaluation: limits, silent garbage, outputs."""
    c: list[Case] = []
    gen = ['{w}/run/export', '--num_samples', '2', '--steps', '4']
    for extra, names in (
        (['--eval_time', 'next+inf'], ['eval_time']), (['--steps', '1000000000'], ['steps']),
        (['--seed', str(2**70)], ['seed']), (['--out', '/dev/full'], ['/dev/full']),
        (['--out', '/proc/nope/samples.txt'], ['/proc/nope']), (['--steps', '0'], ['steps']),
        (['--steps', '-3'], ['steps']), (['--num_samples', '-1'], ['num_samples']), (['--tau', '0'], ['tau']),
        (['--tau', 'nan'], ['tau']), (['--tau', '-1'], ['tau']), (['--guidance', 'nan'], ['guidance']),
        (['--initial_noise_scale', 'inf'], ['initial_noise_scale']), (['--blank_length', '0'], ['blank_length']),
        (['--device', 'tpu'], ['device']), (['--device', 'cuda'], ['cuda']),
        (['--prompt', 'once upon a time ' * 200], ['prompt']), (['--template', 'no blanks here'], ['___']),
        (['--out', '{w}'], ['{w}']),
    ):  # fmt: skip
        c.append(Case('generate', [*gen, *extra], names, label='sampling'))
    c.append(Case('generate', ['{w}/nothing_here'], ['nothing_here']))
    c.append(
        Case('generate', ['{w}/scalar.txt'], ['scalar.txt'], lambda w: (w / 'scalar.txt').write_text('hi'))
    )
    c.append(
        Case('generate', ['{w}/emptydir'], ['emptydir'], lambda w: (w / 'emptydir').mkdir(exist_ok=True))
    )
    c.append(Case('generate', ['{w}/run/export', '--num_samples', '2000000', '--steps', '2'], None,
                  limit=60, label='limits', announces=['batches']))  # fmt: skip
    c.append(Case('generate', [*gen, '--prompt', 'the cat 🐈 sat'], None, label='reasonable'))
    c.append(Case('generate', [*gen, '--out', '{w}/case/s.jsonl'], None, label='reasonable'))
    ev = EVAL_ARGS
    for extra, names in (
        (['--num_samples', '100000000'], ['num_samples']), (['--out', '/nonexistent/dir/r.json'], ['/nonexistent']),
        (['--steps', '1000000000'], ['steps']), (['--batch_size', '0'], ['batch_size']),
        (['--tau', 'nan'], ['tau']), (['--data_root', '{w}/nodata'], ['nodata']),
        (['--out', '/dev/full'], ['/dev/full']), (['--judge', '{w}/nojudge'], ['nojudge']),
    ):  # fmt: skip
        c.append(Case('eval', [*ev, *extra], names, label='sampling'))
    c.append(Case('eval', [*ev, '--out', '{w}/case/r.json'], None, label='reasonable'))
    return c


def resuming_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Resuming on data converted again with another tokenizer or canvas."""
    c: list[Case] = []

    def reconverted(*args: str) -> Callable[[Path], None]:
        def setup(w: Path) -> None:
            copy_tree(w / 'run', w / 'case')
            shutil.rmtree(w / 'case' / 'export', ignore_errors=True)

        return setup

    c.append(Case('train', train_args('variables.data_root={w}/data300', 'max_duration=4ba'), ['tokenizer'],
                  reconverted(), label='resume'))  # fmt: skip
    c.append(Case('train', train_args('variables.data_root={w}/data48', 'max_duration=4ba'), ['seq_len'],
                  reconverted(), label='resume'))  # fmt: skip
    c.append(Case('eval', [*EVAL_ARGS[:2], '{w}/data300', *EVAL_ARGS[3:]], ['vocabulary'], label='resume'))
    return c


def converter_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """The converter."""
    c: list[Case] = []
    conv = CONVERT_ARGS
    for extra, names in (
        (['--size_limit', '0'], ['size_limit']), (['--seq_len', '0'], ['seq_len']), (['--seq_len', '-5'], ['seq_len']),
        (['--num_train', '-1'], ['num_train']), (['--val_fraction', '1.5'], ['val_fraction']),
        (['--batch_stories', '0'], ['batch_stories']), (['--max_story_chars', '0'], ['max_story_chars']),
        (['--num_workers', '-1'], ['num_workers']), (['--train_tokenizer', '0'], ['train_tokenizer']),
        (['--out_root', '/proc/nope/data'], ['/proc/nope']),
    ):  # fmt: skip
        c.append(Case('convert', [*conv, *extra], names, label='convert'))
    files = [
        '--source',
        'files',
        '--out_root',
        '{w}/case/data',
        '--train_tokenizer',
        '300',
        '--val_fraction',
        '0.1',
    ]
    c.append(Case('convert', [*files, '--train_files', '{w}/missing.txt'], ['missing.txt'], label='convert'))
    c.append(Case('convert', [*files, '--train_files', '{w}/binary.txt'], ['binary.txt'],
                  lambda w: (w / 'binary.txt').write_bytes(bytes(range(256)) * 64), label='convert'))  # fmt: skip
    c.append(Case('convert', [*files, '--train_files', '{w}/empty.txt'], ['empty.txt'],
                  lambda w: (w / 'empty.txt').write_text(''), label='convert'))  # fmt: skip
    c.append(Case('convert', [*files, '--train_files', '{w}/rows.jsonl', '--text_column', 'story'], ['story'],
                  lambda w: (w / 'rows.jsonl').write_text('{"text": "a story."}\n' * 50), label='convert'))  # fmt: skip
    c.append(Case('convert', [*conv[:2], '--out_root', '{w}/case/data', '--tokenizer', '{w}/notok'], ['notok'],
                  label='convert'))  # fmt: skip
    return c


def outputs_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Outputs that are inputs, work without bounds, prompts, and the last probe's leftovers."""
    c: list[Case] = []
    gen = ['{w}/run/export', '--num_samples', '1', '--steps', '2']
    for out, names in (('{w}/run/ckpt/latest-rank0.pt', ['latest-rank0.pt']), ('{w}/run/export', ['export']),
                       ('{w}/run/export/model.safetensors', ['model.safetensors']), ('{w}/case', ['case']),
                       ('/dev/full', ['/dev/full']), ('{w}/fifo', ['fifo'])):  # fmt: skip
        c.append(Case('generate', [*gen, '--out', out], names, lambda w: os.mkfifo(w / 'fifo'), limit=60,
                      protect=['run/export/model.safetensors', 'run/ckpt/latest-rank0.pt'], label='outputs'))  # fmt: skip
    c.append(Case('eval', [*EVAL_ARGS, '--out', '{w}/data/cdcd_dataset.json'], ['cdcd_dataset.json'],
                  protect=['data/cdcd_dataset.json'], label='outputs'))  # fmt: skip
    c.append(Case('export', ['{w}/run/export', '{w}/run/export', '--format', 'hf'], ['export'],
                  protect=['run/export/model.safetensors'], label='outputs'))  # fmt: skip
    for flag, value in (('--num_samples', '1000000000000'), ('--steps', '2.5'), ('--tau', '5e-324'),
                        ('--guidance', '1e30'), ('--batch_size', '-1')):  # fmt: skip
        c.append(Case('generate', [*gen, flag, value], [flag], limit=60, label='bounds'))
    c.append(
        Case('eval', [*EVAL_ARGS, '--nll_samples', '1000000000'], ['nll_samples'], limit=60, label='bounds')
    )
    for prompt, names in (('\udcff\udcfe story', ['prompt']), ('x' * 100_000, ['prompt']),
                          ('[SEP] [PAD]', None)):  # fmt: skip
        c.append(Case('generate', [*gen, '--prompt', prompt], names, limit=60, label='prompts'))
    c.append(
        Case('train', train_args('load_path={w}/run', 'autoresume=false'), ['load_path'], label='leftovers')
    )
    return c


def full_disk_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """A full disk (a real one: the tmpfs at {w}/full), for every writer."""
    c: list[Case] = []
    mb = 10**6
    for fmt in ('cdcd', 'hf'):
        c.append(Case('export', ['{w}/run/ckpt/latest-rank0.pt', '{w}/full/exp', '--format', fmt], ['full/exp', 'free'],
                      lambda w: leave_free(w, 50_000), label='full disk'))  # fmt: skip
    c.append(Case('convert', [*CONVERT_ARGS[:2], '--out_root', '{w}/full/data', '--num_train', '200000', '--num_val', '16',
                              '--size_limit', '100kb'], ['full/data', 'free'], lambda w: leave_free(w, 3 * mb),
                  label='full disk'))  # fmt: skip
    c.append(Case('train', train_args('save_folder={w}/full/ckpt'), ['full/ckpt', 'free'],
                  lambda w: leave_free(w, 50_000), label='full disk'))  # fmt: skip
    c.append(Case('train', train_args('save_folder={w}/full/ckpt', 'save_interval=1ba'), ['ba2', 'free', 'ba1'],
                  lambda w: leave_free(w, checkpoint_size(w) * 3 // 2), label='full disk'))  # fmt: skip
    c.append(Case('train', train_args('callbacks.export_weights.folder={w}/full/export'), ['full/export', 'free'],
                  lambda w: leave_free(w, 50_000), label='full disk'))  # fmt: skip
    return c


def export_cases() -> list[Case]:  # noqa: PLR0915 - a table, one entry per input
    """Export."""
    c: list[Case] = []
    c.append(Case('export', ['{w}/nothing.pt', '{w}/case/out'], ['nothing.pt']))
    c.append(Case('export', ['{w}/run/ckpt/latest-rank0.pt', '{w}/afile'], ['afile'],
                  lambda w: (w / 'afile').write_text('mine'), protect=['afile']))  # fmt: skip
    c.append(Case('export', ['{w}/run/ckpt/latest-rank0.pt', '{w}/case/out'], None, label='reasonable'))
    return c


def cases() -> list[Case]:
    """Every input, grouped by the class of fault."""
    tables = (
        code_execution_cases,
        data_loss_cases,
        config_cases,
        formats_cases,
        exports_cases,
        sampling_cases,
        resuming_cases,
        converter_cases,
        outputs_cases,
        full_disk_cases,
        export_cases,
    )
    return [case for table in tables for case in table()]


def build_fixtures(tree: Path, w: Path) -> None:
    """A dataset, two re-converted variants and a 2-batch tiny run, made by the tree's own scripts."""
    py, env = (
        sys.executable,
        dict(os.environ, PYTHONPATH=str(tree)),
    )  # the tree's package, not the installed one
    convert = [
        py,
        str(tree / SCRIPTS['convert']),
        '--source',
        'synthetic',
        '--num_val',
        '32',
        '--no_progress',
    ]
    for out, extra in (('data', ['--train_tokenizer', '400', '--seq_len', '64']),
                       ('data300', ['--train_tokenizer', '300', '--seq_len', '64']),
                       ('data48', ['--train_tokenizer', '400', '--seq_len', '48'])):  # fmt: skip
        subprocess.run(
            [*convert, '--out_root', str(w / out), '--num_train', '128', *extra], check=True, cwd=w, env=env
        )
    run = [str(a).format(w=w, tree=tree).replace('/case', '/run') for a in train_args()]
    subprocess.run([py, str(tree / 'train.py'), *run], check=True, cwd=w, env=env)


def run_case(case: Case, tree: Path, w: Path, logs: Path, index: int) -> tuple[str, str]:
    """Runs one case in a forked child; returns (class, the last line it printed)."""
    fresh_case_folder(w)
    if case.setup:
        case.setup(w)
    before = {rel: (w / rel).read_bytes() for rel in case.protect if (w / rel).is_file()}
    out, err = logs / f'{index}.out', logs / f'{index}.err'
    args = [a.format(w=w, tree=tree) for a in case.args]
    pid = os.fork()
    if pid == 0:
        os.setpgrp()
        code = child(str(tree / SCRIPTS[case.entry]), args, out, err)
        os._exit(code)
    code, deadline = None, time.monotonic() + case.limit
    while code is None and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        code = os.waitstatus_to_exitcode(status) if done else None
        time.sleep(0.05) if code is None else None
    if code is None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    stderr = err.read_text(errors='replace')
    lines = [line for line in stderr.splitlines() if line.strip() and not NOISE.match(line)]
    last = lines[-1] if lines else ''
    if code is None and case.announces:  # still running at its limit: did it say what it is doing?
        said = (out.read_text(errors='replace') + stderr).splitlines()
        last = next((line for line in said if all(n in line for n in case.announces)), last)
    return classify(case, code, stderr, last, before, w), last


def child(script: str, args: list[str], out: Path, err: Path) -> int:
    """The forked child: the script as `__main__`, its output in files; returns the exit status."""
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what reaches the user is what we classify
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def classify(case: Case, code: int | None, stderr: str, last: str, before: dict, w: Path) -> str:
    """The outcome's class (see the module docstring)."""
    if (w / 'PWNED').exists():
        (w / 'PWNED').unlink()
        return 'code execution'
    if any(not (w / rel).is_file() or (w / rel).read_bytes() != data for rel, data in before.items()):
        return 'data loss'
    if len(before) < len(case.protect):
        return 'data loss'
    if 'Traceback (most recent call last)' in stderr:
        return 'traceback'
    if case.names is None:
        announced = code is None and case.announces and all(n in last for n in case.announces)
        return 'handled' if code == 0 or announced else 'silent' if code is None else 'unclear'
    if code is None or code == 0:
        return 'silent'
    named = all(n.format(w=w).lower() in last.lower() for n in case.names)
    return 'one-line error' if named else 'unclear'


def main() -> None:
    """Builds the fixtures, runs every case, prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tree', default=str(Path(__file__).resolve().parents[1]), help='the checkout to probe')
    p.add_argument('--work', default=None, help='work folder (default: a temporary one)')
    p.add_argument('--only', default=None, help='run only cases whose entry or label is this')
    p.add_argument('--verbose', action='store_true', help='one row per case')
    p.add_argument('--no_full_disk', action='store_true', help='leave out the full-disk cases')
    args = p.parse_args()
    tree = Path(args.tree).resolve()
    w = Path(args.work or tempfile.mkdtemp(prefix='cdcd-probe-')).resolve()
    (w / FULL).mkdir(parents=True, exist_ok=True)
    if not args.no_full_disk and not os.path.ismount(w / FULL) and not os.environ.get('CDCD_PROBE_NAMESPACE'):
        rerun_with_a_small_disk(w)
    os.environ.update(OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1')
    if not (w / 'run' / 'export').exists():
        build_fixtures(tree, w)
    sys.path.insert(0, str(tree))
    os.chdir(w)
    import composer  # noqa: F401 - imported once, before the forks
    import streaming  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(1)
    logs = w / 'logs'
    logs.mkdir(exist_ok=True)
    counts: dict[str, Counter] = {}
    selected = [c for c in cases() if args.only in (None, c.entry, c.label)]
    if not os.path.ismount(w / FULL):
        print('the full-disk cases are left out (--no_full_disk, or no mount namespace here)', flush=True)
        selected = [c for c in selected if c.label != 'full disk']
    for i, case in enumerate(selected):
        started = time.monotonic()
        cls, last = run_case(case, tree, w, logs, i)
        counts.setdefault(case.entry, Counter())[cls] += 1
        if args.verbose:
            shown = ' '.join(case.args)[-90:]
            print(f'{i:3d} {case.entry:8s} {cls:15s} {time.monotonic() - started:5.1f}s  {shown}\n      -> {last[:200]}',
                  flush=True)  # fmt: skip
    print_table(tree, counts)


def rerun_with_a_small_disk(w: Path) -> None:
    """Runs this probe again in a mount namespace of its own, with a 32 MB tmpfs at {w}/full.

    Returns only when no namespace can be made (no `unshare`, no privilege).
    """
    mount = f'mount -t tmpfs -o size=32m tmpfs {w / FULL} && exec "$@"'
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--work', str(w)]
    env = dict(os.environ, CDCD_PROBE_NAMESPACE='1')
    for unshare in (['unshare', '--mount'], ['unshare', '--user', '--map-root-user', '--mount']):
        if (
            shutil.which('unshare')
            and subprocess.run([*unshare, 'true'], capture_output=True).returncode == 0
        ):
            sys.exit(subprocess.run([*unshare, 'sh', '-c', mount, 'sh', *argv], env=env).returncode)


def print_table(tree: Path, counts: dict[str, Counter]) -> None:
    """One row per class, one column per entry point, and the total."""
    entries = list(counts)
    print(f'\nprobe of {tree}: {sum(sum(c.values()) for c in counts.values())} inputs')
    print('| class | ' + ' | '.join(entries) + ' | total |')
    print('|---|' + '---|' * (len(entries) + 1))
    for cls in CLASSES:
        row = [counts[e][cls] for e in entries]
        print(f'| {cls} | ' + ' | '.join(str(n) for n in row) + f' | {sum(row)} |')


if __name__ == '__main__':
    main()
