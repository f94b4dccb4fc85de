"""Runs the parity-option ablations on the offline corpus and prints the table of docs/ablations.md.

    python docs/ablations.py                 # every row: ~35 min on 2 CPU cores
    python docs/ablations.py --rows baseline edm --steps 300   # a subset, shorter

Every row trains cdcd-tiny (or cdcd-char) for the same number of steps with the same seed and
data order, then reports the validation CE at fixed t (all validation stories, noise seeded) and
the share of sampled sentences the synthetic corpus grammar derives exactly (64 samples, 200
Euler steps, the model's own time warp), with two collapse checks on the samples' words:
distinct bigrams over all bigrams and the share of repeated 4-grams within a sample. Sampling-only
rows reuse the baseline's weights. Rows whose outputs exist under runs/ablations/ are not rerun
(delete the row's folder to redo it); `--seed 18` repeats rows with another seed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cdcd_composer.data.grammar import recognised_fraction  # noqa: E402
from cdcd_composer.evaluation import distinct_n, repetition_rate  # noqa: E402

DATA = {'words': 'data/synthetic', 'bytes': 'data/synthetic-char'}
CONVERT = {
    'words': 'python data_prep/convert_tinystories.py --source synthetic --out_root data/synthetic',
    'bytes': 'python data_prep/convert_tinystories.py --source synthetic --tokenizer bytes --seq_len 512 '
    '--out_root data/synthetic-char',
}
CPU_5M = [
    'variables.data_root=data/synthetic', 'global_train_batch_size=32', 'scheduler.t_warmup=100ba',
    'data.num_workers=0', 'callbacks.time_warp_refit.interval=50ba',
]  # fmt: skip
# name -> (YAML, training overrides, or None / a row's name to sample the baseline's / that row's
# model, sampling flags)
ROWS = {
    'baseline': ('cdcd-tiny', [], []),
    'edm': ('cdcd-tiny', ['model.preconditioning=edm'], []),
    'tanh': ('cdcd-tiny', ['model.preconditioning=tanh'], []),
    'mse': ('cdcd-tiny', ['loss.mse_weight=1.0'], []),
    'mse-0.1': ('cdcd-tiny', ['loss.mse_weight=0.1'], []),
    'layernorm': ('cdcd-tiny', ['model.embedding_norm=layernorm'], []),
    'resample': ('cdcd-tiny', None, ['--seed', '1']),  # the baseline's samples from other noise
    'shift-0.1': ('cdcd-tiny', None, ['--eval_time', 'next+0.1']),  # the asymmetric time shift
    'shift-1': ('cdcd-tiny', None, ['--eval_time', 'next+1.0']),
    'char': ('cdcd-char', [], []),
    # Self-conditioning with one coin per batch instead of on half of every microbatch: the same
    # expected fraction, fewer kernel launches per step.
    'sc-per-batch': ('cdcd-tiny', ['algorithms.self_conditioning.per=batch'], []),
    # The cdcd-5m network at the paper's t_max = 300 with masks and self-conditioning,
    # shortened for 2 CPU cores: batch 32, warm-up 100 steps, refits every 50 steps (the YAML's
    # buffer of 16,384 pairs).
    'warp-5m': ('cdcd-5m', CPU_5M, []),
    # In 800 CPU steps the warp row accepts no refit before the last batch, so its training draws
    # are exactly the uniform run's (checked: bit-equal losses); uniform sampling steps on its weights.
    'uniform-5m': ('cdcd-5m', 'warp-5m', ['--warp', 'none']),
}
EVAL_T = ('1', '3', '10', '20', '30')


def run(cmd: str) -> str:
    """Runs a shell command from the repository root; its stdout, or exit with its stderr."""
    print(f'$ {cmd}', file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'failed: {cmd}\n{proc.stderr[-2000:]}')
    return proc.stdout


def train_command(name: str, yaml: str, overrides: list[str], steps: int) -> str:
    """The training command of a row (every run writes under runs/ablations/NAME)."""
    out = f'runs/ablations/{name}'
    common = [
        f'run_name=abl-{name}', f'max_duration={steps}ba', f'eval_interval={steps}ba',
        'eval_subset_num_batches=-1', 'save_folder=null', 'callbacks.training_samples=false',
        f'callbacks.export_weights.folder={out}/export', f'callbacks.time_warp_refit.plot_folder={out}',
        f'loggers.file.filename={out}/log.txt', 'progress_bar=false',
    ]  # fmt: skip
    return f'python train.py yamls/{yaml}.yaml {" ".join(common + overrides)}'


def final_eval(log_file: str) -> dict[str, float]:
    """The last logged validation CE at each fixed t, from the file logger's lines."""
    found: dict[str, float] = {}
    with open(os.path.join(REPO, log_file)) as f:
        for line in f:
            match = re.search(r'metrics/eval/CE_t(\w+): ([0-9.eE+-]+)', line)
            if match:
                found[match.group(1)] = float(match.group(2))
    return found


def refits(log_file: str) -> str:
    """'accepted/attempted' time-warp refits from the file logger's lines ('' without the callback)."""
    with open(os.path.join(REPO, log_file)) as f:
        outcomes = [float(m.group(1)) for m in re.finditer(r'time_warp/accepted: ([0-9.]+)', f.read())]
    return f'{int(sum(outcomes))}/{len(outcomes)}' if outcomes else ''


def main() -> None:
    """Trains and samples every requested row, then prints the markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--num_samples', type=int, default=64)
    p.add_argument('--seed', type=int, default=None, help="another training seed (the YAML's: 17)")
    args = p.parse_args()
    suffix = '' if args.seed is None else f'-seed{args.seed}'
    python = sys.executable
    table = []
    for name in args.rows:
        yaml, overrides, sample_flags = ROWS[name]
        seed = [] if args.seed is None else [f'seed={args.seed}']
        data = 'bytes' if yaml == 'cdcd-char' else 'words'
        if not os.path.exists(os.path.join(REPO, DATA[data], 'cdcd_dataset.json')):
            run(CONVERT[data].replace('python', python, 1))
        sampled_only = overrides is None or isinstance(overrides, str)
        trained_by = (
            overrides if isinstance(overrides, str) else name if overrides is not None else 'baseline'
        )
        trained_by += suffix
        commands = []
        if not sampled_only:
            commands.append(train_command(name + suffix, yaml, overrides + seed, args.steps))
            if not os.path.exists(os.path.join(REPO, 'runs/ablations', trained_by, 'export')):
                run(commands[-1].replace('python', python, 1))
        samples = f'runs/ablations/{name}{suffix}/samples.jsonl'
        os.makedirs(os.path.join(REPO, os.path.dirname(samples)), exist_ok=True)
        commands.append(
            f'python generate.py runs/ablations/{trained_by}/export --num_samples {args.num_samples} '
            f'--solver euler --steps 200 {" ".join(sample_flags)} --out {samples}'.replace('  ', ' ')
        )
        if not os.path.exists(os.path.join(REPO, samples)):
            run(commands[-1].replace('python', python, 1))
        with open(os.path.join(REPO, samples)) as f:
            texts = [json.loads(line)['text'] for line in f]
        ce = final_eval(f'runs/ablations/{trained_by}/log.txt')
        change = ' '.join(([] if sampled_only else overrides) + sample_flags) or (
            'bytes' if data == 'bytes' else 'paper defaults'
        )
        words = [text.split() for text in texts]
        row = {'row': name + suffix, 'change': change + (f' seed={args.seed}' if seed else ''),
               'ce': [ce.get(t) for t in EVAL_T], 'recognised': recognised_fraction(texts),
               'refits': '' if sampled_only else refits(f'runs/ablations/{trained_by}/log.txt'),
               'distinct2': distinct_n(words, 2), 'rep4': repetition_rate(words, 4),
               'commands': commands}  # fmt: skip
        table.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    columns = ['row', 'change', 'refits accepted', 'CE t=1', 't=3', 't=10', 't=20', 't=30', 'recognised']
    print('| ' + ' | '.join([*columns, 'distinct-2', 'rep-4']) + ' |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for row in table:
        ce = ' | '.join('' if v is None else f'{v:.3f}' for v in row['ce'])
        figures = f'{row["recognised"]:.1%} | {row["distinct2"]:.3f} | {row["rep4"]:.3f}'
        print(f'| {row["row"]} | {row["change"]} | {row["refits"]} | {ce} | {figures} |')
    print('\nCommands, per row:\n')
    for row in table:
        print(f'- {row["row"]}:\n  ```\n' + ''.join(f'  {c}\n' for c in row['commands']) + '  ```')


if __name__ == '__main__':
    main()
