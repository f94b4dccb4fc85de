"""Per-step overhead where a GPU is launch-bound, measured on the CPU (`bench/train.py --overhead`).

    python bench/train.py --overhead --device cpu                   # cdcd-5m and cdcd-140m, 1 and 2 ranks
    python bench/train.py --overhead --configs cdcd-140m --set parallelism_config=null
    python bench/train.py --overhead --device cuda                  # the same rows on a GPU (gpu_check.sh)

Each row keeps a shipped YAML's structure (depth, algorithms, callbacks, parallelism, gradient
accumulation) at a tiny width (d_model 32, d_embed 16, 2 heads, vocabulary 512, 128 tokens,
microbatch 2, 8 microbatches per rank per batch, fp32, 1 thread per rank), so that every op is
nearly free and what a step costs is its per-op dispatch: Python, hooks and kernel launches,
as on a GPU at the YAML's microbatch. With `--device cuda` the rows run on the GPU instead, under
the YAML's precision (bf16 autocast where it says so or leaves it to the device), each timed batch
ending in a device sync; the 2-rank row needs 2 GPUs (NCCL puts one rank on each).
- `bare step`: the same model's own step (built as `train.py` builds it: the YAML's noise range
  and conditioning masks), forward and backward of each microbatch, then the fused AdamW step
  (no self-conditioning, clipping or EMA: the floor), timed over as many steps as the trainer
  rows time batches.
- `composer, N rank(s)`: the Trainer that `train.py` builds from the YAML (eval, checkpoints,
  samples and the export off, as they are not per-batch), on N processes (gloo; NCCL on GPUs).
s/batch is the mean over the timed batches (the mean, as with `--set
algorithms.self_conditioning.per=batch` a batch runs either one pass or two per microbatch);
aten ops/batch are counted by `torch.profiler` over one batch (that batch is not timed). `vs
bare` divides by the bare step; `vs 1 rank` divides the 2-rank row by the 1-process row (the
same per-rank microbatches). The three rows run `--repeats` times, interleaved, and each shows
its median run: on a shared machine a burst of other work slows one run, not one row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WIDTHS = {'d_model': 32, 'd_embed': 16, 'n_heads': 2, 'd_time': 16, 'n_fourier': 16}
VOCAB, SEQ_LEN, MICROBATCH, MICROBATCHES = 512, 128, 2, 8
PROFILED = range(3, 7)  # the batches whose aten ops are counted, per batch on average (untimed)
MIN_BATCHES = PROFILED[-1] + 1  # the warm-up and profiled batches, then at least one timed batch


def timed_batches(batches: int) -> int:
    """How many of a trainer row's `batches` are timed (the bare row times as many steps)."""
    return batches - MIN_BATCHES + 1


def aten_ops(profiler: torch.profiler.profile) -> int:
    """The aten ops a finished profile saw (nested ones included)."""
    return sum(1 for event in profiler.events() if event.name.startswith('aten::'))


def profiler() -> torch.profiler.profile:
    """A CPU profiler of op dispatches."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def synchronize(device: str) -> None:
    """Waits for the device's queued work, so that a wall clock read after it counts that work."""
    if device == 'cuda':
        torch.cuda.synchronize()


def bare_row(config: str, steps: int, device: str) -> dict[str, float]:
    """s/batch and aten ops/batch of the model's own step (runs in the row's subprocess)."""
    from cdcd_composer.composer_model import CDCDComposerModel
    from cdcd_composer.config import load_config, parse_config
    from cdcd_composer.optim import FusedDecoupledAdamW
    from cdcd_composer.preflight import default_precision

    torch.manual_seed(0)
    cfg = parse_config(load_config(config, [f'model.{k}={v}' for k, v in WIDTHS.items()]))
    # The model train.py builds: the YAML's noise range and conditioning masks are its objective.
    model = CDCDComposerModel(
        model=dataclasses.asdict(cfg.model) | {'vocab_size': VOCAB}, t_min=cfg.diffusion.t_min,
        t_max=cfg.diffusion.t_max, masking=cfg.masking, mse_weight=cfg.loss.mse_weight,
    ).to(device)  # fmt: skip
    optimizer = FusedDecoupledAdamW(model.parameters(), lr=1e-4)
    microbatches = [
        {'tokens': torch.randint(0, VOCAB, (MICROBATCH, SEQ_LEN), device=device)} for _ in range(MICROBATCHES)
    ]
    precision = 'fp32' if device == 'cpu' else cfg.precision or default_precision('gpu')
    autocast = torch.autocast(device, torch.bfloat16, enabled=precision == 'amp_bf16')

    def step() -> None:
        for microbatch in microbatches:
            with autocast:
                loss = model.loss(model(microbatch), microbatch) / MICROBATCHES
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    step()  # warm-up
    with profiler() as prof:
        step()
    ops = aten_ops(prof)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {'seconds': statistics.mean(times), 'ops': ops}


def trainer_overrides(
    data_root: str, batches: int, ranks: int, extra: list[str], device: str = 'cpu'
) -> list[str]:
    """The YAML at the tiny width, for `batches` batches of 8 microbatches per rank, nothing else."""
    on_device = ['device=cpu', 'precision=fp32'] if device == 'cpu' else ['device=gpu']
    return [
        f'variables.data_root={data_root}', f'max_duration={batches}ba', 'eval_interval=100000ba',
        'save_folder=null', 'progress_bar=false', 'log_to_console=false', 'loggers={}',
        'run_name=bench-overhead', 'callbacks.export_weights=false', 'callbacks.training_samples=false',
        'autoresume=false', 'callbacks.time_warp_refit.plot_folder=null', 'data.local_cache=null',
        'data.num_workers=0', *on_device,
        f'global_train_batch_size={MICROBATCH * MICROBATCHES * ranks}',
        f'device_train_microbatch_size={MICROBATCH}', *[f'model.{k}={v}' for k, v in WIDTHS.items()], *extra,
    ]  # fmt: skip


def trainer_row(
    config: str, data_root: str, batches: int, ranks: int, extra: list[str], device: str
) -> dict[str, float]:
    """s/batch and aten ops/batch of the Composer path (runs on every rank of the row's launch)."""
    from composer.core import Callback
    from composer.utils import dist

    from cdcd_composer.commands import train
    from cdcd_composer.config import load_config

    ends: list[float] = []
    ops: list[int] = []

    class Clock(Callback):
        """Times every batch end; profiles the PROFILED batches from the first's start to the last's end."""

        def batch_start(self, state, logger) -> None:
            if int(state.timestamp.batch) + 1 == PROFILED.start:
                self.profiler = profiler().__enter__()

        def batch_end(self, state, logger) -> None:
            synchronize(device)
            if int(state.timestamp.batch) == PROFILED[-1]:
                self.profiler.__exit__(None, None, None)
                ops.append(round(aten_ops(self.profiler) / len(PROFILED)))
            ends.append(time.perf_counter())

    cfg = load_config(config, trainer_overrides(data_root, batches, ranks, extra, device))
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    trainer.state.callbacks.append(Clock())
    trainer.fit()
    # Interval i runs batch i + 2 (1-based); the profiled batches and the first two (warm-up) are not timed.
    intervals = [b - a for i, (a, b) in enumerate(zip(ends, ends[1:])) if i + 2 not in PROFILED and i >= 1]
    row = {'seconds': statistics.mean(intervals), 'ops': ops[0]}
    return row if dist.get_global_rank() == 0 else {}


def run_subprocess(cmd: list[str]) -> dict[str, float]:
    """Runs one row in fresh interpreters (one per rank) and returns rank 0's JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('FSDP_VERSION', None)  # train.py's default, as a user runs it
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f'row failed: {" ".join(cmd[:8])}...\n{proc.stderr[-3000:]}')
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"seconds"')]
    return json.loads(lines[-1])


def print_table(args: argparse.Namespace, config_path, random_token_dataset) -> None:
    """Runs the rows of every config and prints them (`bench/train.py` passes its helpers)."""
    if args.batches < MIN_BATCHES:
        raise SystemExit(f'--batches {args.batches}: the overhead rows need at least {MIN_BATCHES} batches')
    configs = args.configs or ['cdcd-5m', 'cdcd-140m']
    me = os.path.abspath(__file__)
    launcher = [sys.executable, '-m', 'composer.cli.launcher']  # `composer`, wherever pip put its script
    extra = ['--set', *args.set] if args.set else []
    gpu = args.device == 'cuda'
    two_ranks = not gpu or torch.cuda.device_count() >= 2
    where = f'{torch.cuda.get_device_name()}, the YAML precision' if gpu else 'CPU, 1 thread per rank, fp32'
    print(
        f'{where}; tiny width {WIDTHS}, vocab {VOCAB}, {SEQ_LEN} tokens, {MICROBATCHES} microbatches '
        f'of {MICROBATCH} per rank; median of {args.repeats} interleaved runs'
    )
    if not two_ranks:
        print('(no 2-rank rows: they need 2 GPUs)')
    print(f'{"row":<34}{"s/batch":>10}{"aten ops/batch":>16}{"vs bare":>9}{"vs 1 rank":>11}')
    with tempfile.TemporaryDirectory() as tmp:
        data_root = random_token_dataset(tmp, VOCAB, SEQ_LEN, stories=400)
        for name in configs:
            path = config_path(name)
            steps = str(timed_batches(args.batches))
            common = [me, '--row', path, '--device', args.device, '--batches', str(args.batches),
                      '--data_root', data_root, *extra]  # fmt: skip
            bare = [sys.executable, me, '--row', path, '--device', args.device, '--bare', '--steps', steps]
            commands = {
                'bare': bare,
                'one': [*launcher, '-n', '1', *common, '--ranks', '1'],
            }
            if two_ranks:
                commands['two'] = [*launcher, '-n', '2', *common, '--ranks', '2']
            # Interleaved repeats, each row's median: a busy machine slows one run, not a row.
            runs = [{k: run_subprocess(cmd) for k, cmd in commands.items()} for _ in range(args.repeats)]
            rows = {k: median_run([run[k] for run in runs]) for k in commands}
            print_row(f'{name} bare step', rows['bare'], rows['bare'])
            print_row(f'{name} composer, 1 process', rows['one'], rows['bare'])
            if two_ranks:
                print_row(f'{name} composer, 2 ranks', rows['two'], rows['bare'], rows['one'])


def median_run(rows: list[dict]) -> dict:
    """The run whose s/batch is the median of `rows` (the lower one of an even count)."""
    return sorted(rows, key=lambda row: row['seconds'])[(len(rows) - 1) // 2]


def print_row(label: str, row: dict, bare: dict, one: dict | None = None) -> None:
    """One line of the table."""
    vs_one = f'{row["seconds"] / one["seconds"]:.2f}x' if one else ''
    print(
        f'{label:<34}{row["seconds"]:>10.3f}{row["ops"]:>16,}'
        f'{row["seconds"] / bare["seconds"]:>8.2f}x{vs_one:>11}'
    )


def main() -> None:
    """One row as JSON (`--row`), for `bench/train.py --overhead`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--row', required=True)
    p.add_argument('--bare', action='store_true')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--batches', type=int, default=24)
    p.add_argument('--ranks', type=int, default=1)
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--data_root')
    p.add_argument('--set', nargs='+', default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.bare:
        row = bare_row(args.row, args.steps, args.device)
    else:
        row = trainer_row(args.row, args.data_root, args.batches, args.ranks, args.set, args.device)
    if row:
        print(json.dumps(row))


if __name__ == '__main__':
    main()
