"""Training throughput of the shipped configs against the hardware limit, side by side in one run.

    python bench/train.py                                   # CPU: cdcd-tiny and cdcd-5m, fp32, 2 threads
    python bench/train.py --trainer                         # + the real Composer path beside each row
    python bench/train.py --profile                         # + where one step's time goes
    python bench/train.py --configs cdcd-140m --compile     # GPU: bf16 autocast, eager vs compiled, MFU
    python bench/train.py --overhead                        # CPU: per-step overhead, launch-bound regime

`--overhead` is the regime where a GPU is launch-bound, on the CPU: see bench/overhead.py.

`--trainer` adds a row that runs what a user launches: the Composer Trainer built by
`train.py` from the YAML (its algorithms, callbacks, precision, parallelism and
microbatching) for `--batches` batches on a real MDS dataset: `--data_root`, or random tokens
over a generated `--vocab_size` vocabulary (converted once into a temporary directory). Its
step time is the median interval between consecutive batch ends (data loading and every
callback included; evaluation, checkpoints, samples and the export are switched off). The
bare rows then run at the YAML's per-device batch, and `vs bare` is the bare step's FLOP/s
over the trainer's: the overhead per unit of work (the trainer's FLOPs include
self-conditioning's extra pass).

Every row is a full training step (corruption, forward, loss, backward, fused decoupled AdamW)
on random tokens, timed in its own subprocess so that rows do not share allocator state. On
CPU the limit is a dense fp32 matmul measured in this run; on a GPU it is Composer's table of
peak FLOP/s for the device and precision (what SpeedMonitor's MFU divides by). FLOPs are the
model's `flops_per_batch` (3 x the matmul FLOPs of a forward pass).
Step times are medians over the timed steps (robust to a noisy shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cdcd_composer.composer_model import CDCDComposerModel  # noqa: E402
from cdcd_composer.optim import FusedDecoupledAdamW  # noqa: E402


def matmul_peak(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """Best-of-`repeats` fp32 FLOP/s of a (size x size) @ (size x size) matmul on the CPU."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gpu_peak(precision: str) -> float:
    """Composer's peak FLOP/s for this GPU and precision (0 when the device is not in its table)."""
    from composer.callbacks.speed_monitor import get_gpu_flops_available
    from composer.core import Precision

    return float(get_gpu_flops_available(SimpleNamespace(precision=Precision(precision))) or 0)


def config_path(name: str) -> str:
    """A YAML path for 'cdcd-5m' (a name in yamls/) or a path as given."""
    return name if name.endswith('.yaml') else os.path.join(REPO, 'yamls', f'{name}.yaml')


def build(args: argparse.Namespace) -> tuple[CDCDComposerModel, torch.optim.Optimizer, dict]:
    """The row's model (YAML architecture, `vocab_size` from the flags), optimizer and random batch."""
    with open(config_path(args.row)) as f:
        model_cfg = yaml.safe_load(f)['model']
    model_cfg['vocab_size'] = args.vocab_size
    model = CDCDComposerModel(model_cfg).to(args.device)
    optimizer = FusedDecoupledAdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    return model, optimizer, {'tokens': tokens}


def random_token_dataset(out: str, vocab_size: int, seq_len: int, stories: int = 2000) -> str:
    """A converted dataset of random-word stories over a `vocab_size` WordPiece vocabulary (offline)."""
    from transformers import BertTokenizerFast

    from cdcd_composer.data.conversion import convert

    specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    words = [f'w{i}' for i in range(vocab_size - len(specials))]
    os.makedirs(os.path.join(out, 'source'), exist_ok=True)
    vocab = os.path.join(out, 'source', 'vocab.txt')
    with open(vocab, 'w') as f:
        f.write('\n'.join(specials + words) + '\n')
    BertTokenizerFast(vocab_file=vocab).save_pretrained(os.path.join(out, 'tokenizer'))
    generator = torch.Generator().manual_seed(0)
    for split, count in (('train', stories), ('val', 64)):
        ids = torch.randint(0, len(words), (count, seq_len), generator=generator).tolist()
        with open(os.path.join(out, 'source', f'{split}.txt'), 'w') as f:
            f.write('\n<|endoftext|>\n'.join(' '.join(words[i] for i in row) for row in ids))
    root = os.path.join(out, 'data')
    source = os.path.join(out, 'source')
    convert(
        source='files', out_root=root, seq_len=seq_len, tokenizer=os.path.join(out, 'tokenizer'),
        train_files=[os.path.join(source, 'train.txt')], val_files=[os.path.join(source, 'val.txt')],
    )  # fmt: skip
    return root


class BatchClock:
    """A Composer callback recording the wall time of every batch end."""

    def __init__(self) -> None:
        from composer.core import Callback

        self.times: list[float] = []
        self.callback = type('BatchClock', (Callback,), {'batch_end': lambda _, state, logger: self.tick()})()

    def tick(self) -> None:
        """Records now (after synchronising the GPU, so queued work is counted)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def trainer_config(args: argparse.Namespace) -> dict:
    """The YAML as `train.py` reads it, for `args.batches` timed batches and nothing else."""
    from cdcd_composer.config import load_config

    overrides = [
        f'variables.data_root={args.data_root}', f'max_duration={args.batches}ba', 'eval_interval=100000ba',
        'save_folder=null', 'progress_bar=false', 'log_to_console=false', 'loggers={}',
        'run_name=bench-trainer',
        'callbacks.export_weights=false', 'callbacks.training_samples=false', 'autoresume=false',
        'callbacks.time_warp_refit.plot_folder=null', 'data.local_cache=null',
    ]  # fmt: skip
    overrides.append(f'global_train_batch_size={args.batch_size}')  # one process: its whole batch
    overrides.append('device=cpu' if args.device == 'cpu' else 'device=gpu')
    overrides += args.set
    if args.precision != 'amp_bf16' or args.device == 'cpu':
        overrides.append(f'precision={args.precision}')
    return load_config(config_path(args.row), overrides)


def measure_trainer_row(args: argparse.Namespace) -> dict[str, float]:
    """Runs the real Composer Trainer for `args.batches` batches (this runs in the row's subprocess)."""
    from cdcd_composer.commands import train

    torch.set_num_threads(args.threads)
    trainer = train.main(trainer_config(args), return_trainer=True, do_train=False)
    clock = BatchClock()
    trainer.state.callbacks.append(clock.callback)
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:])][2:]  # the first batches warm up
    seconds = statistics.median(intervals)
    model = trainer.state.model
    model = getattr(model, 'module', model)  # DDP
    return row_figures(
        args, model, {'tokens': torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)}, seconds
    )


def row_figures(
    args: argparse.Namespace, model: CDCDComposerModel, batch: dict, seconds: float
) -> dict[str, float]:
    """A row's measurements from its median step time (and the GPU's peak memory)."""
    peak = torch.cuda.max_memory_allocated() if args.device == 'cuda' else 0
    return {
        'tokens_per_s': args.batch_size * args.seq_len / seconds,
        'flops_per_s': model.flops_per_batch(batch) / seconds,
        'step_s': seconds,
        'peak_gib': peak / 2**30,
    }


def measure_row(args: argparse.Namespace) -> dict[str, float]:
    """Times `args.steps` training steps of one config (this runs in the row's subprocess)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, optimizer, batch = build(args)
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(args.device, torch.bfloat16, enabled=args.precision == 'amp_bf16')

    def step() -> None:
        with autocast:
            loss = model.loss(forward(batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize() -> None:
        if args.device == 'cuda':
            torch.cuda.synchronize()

    for _ in range(3 if args.compile else 1):  # warm-up (and compilation)
        step()
    synchronize()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == 'cuda' else [])
        with profile(activities=activities) as prof:
            step()
            synchronize()
        sort = 'self_cuda_time_total' if args.device == 'cuda' else 'self_cpu_time_total'
        print(prof.key_averages().table(sort_by=sort, row_limit=12), file=sys.stderr)
    if args.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return row_figures(args, model, batch, statistics.median(times))


def run_row(
    args: argparse.Namespace, config: str, compile: bool, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    """Runs one row in a fresh interpreter and returns its measurements."""
    cmd = [sys.executable, os.path.abspath(__file__), '--row', config, *sys.argv[1:], *extra]
    if compile:
        cmd.append('--compile')
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f'row {config} failed:\n{proc.stderr[-3000:]}')
    if args.profile:
        print(f'--- {config}{" compiled" if compile else ""}: one step, top operators ---')
        print(proc.stderr[proc.stderr.find('----') :])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Prints the table (or, with --row, one row's measurements as JSON)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--configs', '--config', nargs='+', default=None, help='names in yamls/ or YAML paths')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--precision', default=None, help='fp32 or amp_bf16 (default: amp_bf16 on GPU)')
    p.add_argument('--threads', type=int, default=2, help='CPU intra-op threads')
    p.add_argument('--vocab_size', type=int, default=30522, help='bert-base-uncased size')
    p.add_argument(
        '--batch_size', type=int, default=None,
        help="default: 32 on CPU, 64 on GPU; with --trainer the YAML's global batch unless given",
    )  # fmt: skip
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--steps', type=int, default=None, help='timed steps (default: 5 on CPU, 30 on GPU)')
    p.add_argument('--compile', action='store_true', help='add torch.compile rows next to eager ones')
    p.add_argument('--profile', action='store_true', help='print the top operators of one step per row')
    p.add_argument(
        '--trainer', action='store_true', help='add the Composer Trainer row (train.py) per config'
    )
    p.add_argument('--batches', type=int, default=24, help='batches of each trainer row (2 warm up)')
    p.add_argument(
        '--data_root', default=None, help='trainer rows: a converted dataset (default: random tokens)'
    )
    p.add_argument(
        '--set', nargs='+', default=[], metavar='KEY=VALUE',
        help='trainer rows: YAML overrides, e.g. algorithms.self_conditioning=false (one suspect at a time)',
    )  # fmt: skip
    p.add_argument(
        '--overhead', action='store_true',
        help='each YAML at a tiny width: Composer path vs bare step, 1 and 2 ranks (bench/overhead.py)',
    )  # fmt: skip
    p.add_argument('--repeats', type=int, default=3, help='--overhead: interleaved runs per row (median)')
    p.add_argument('--row', help=argparse.SUPPRESS)
    p.add_argument('--trainer_row', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == 'cuda'
    args.batch_override = args.batch_size is not None
    args.precision = args.precision or ('amp_bf16' if gpu else 'fp32')
    args.batch_size = args.batch_size or (64 if gpu else 32)
    args.steps = args.steps or (30 if gpu else 5)
    if args.row:
        print(json.dumps(measure_trainer_row(args) if args.trainer_row else measure_row(args)))
        return
    if args.overhead:
        import overhead

        overhead.print_table(args, config_path, random_token_dataset)
        return
    if args.trainer and args.data_root is None:
        with tempfile.TemporaryDirectory() as tmp:
            args.data_root = random_token_dataset(tmp, args.vocab_size, args.seq_len)
            print_table(args)
    else:
        print_table(args)


def yaml_batch(config: str) -> int:
    """The YAML's global batch: one process's batch in these rows."""
    with open(config_path(config)) as f:
        return int(yaml.safe_load(f)['global_train_batch_size'])


def print_table(args: argparse.Namespace) -> None:
    """Runs every row and prints the table."""
    gpu = args.device == 'cuda'
    configs = args.configs or (['cdcd-140m'] if gpu else ['cdcd-tiny', 'cdcd-5m'])
    rows = []
    for config in configs:
        rows += [(config, False)] + ([(config, True)] if args.compile else [])
    peak = gpu_peak(args.precision) if gpu else matmul_peak(args.threads)
    name = torch.cuda.get_device_name() if gpu else f'CPU, {args.threads} threads'
    batch = 'the YAML batch' if args.trainer and not args.batch_override else f'batch {args.batch_size}'
    print(f'{name}, {args.precision}, {batch} x {args.seq_len} tokens, vocab {args.vocab_size}')
    limit = 'MFU' if gpu else 'of matmul'
    vs = f'{"vs bare":>9}' if args.trainer else ''
    print(f'{"row":<34}{"tokens/s":>12}{"step s":>9}{"TFLOP/s":>10}{limit:>10}{"peak GiB":>10}{vs}')
    if gpu:
        known = '100.0%' if peak else 'n/a'
        print(f'{"peak (Composer table)":<34}{"":>12}{"":>9}{peak / 1e12:>10.1f}{known:>10}')
    else:
        print(f'{"matmul 1024x1024 fp32":<34}{"":>12}{"":>9}{peak / 1e12:>10.3f}{"100.0%":>10}')
    for config, compile in rows:
        name = os.path.basename(config).removesuffix('.yaml')
        batch = args.batch_size if args.batch_override else yaml_batch(config)
        extra = ('--batch_size', str(batch), '--data_root', args.data_root) if args.trainer else ()
        bare = run_row(args, config, compile, extra)
        print_row(
            f'{name} bare step' + (' compiled' if compile else ''),
            bare,
            peak,
            '1.00x' if args.trainer else '',
        )
        if args.trainer and not compile:
            composer = run_row(args, config, False, (*extra, '--trainer_row'))
            print_row(
                f'{name} composer train.py',
                composer,
                peak,
                f'{bare["flops_per_s"] / composer["flops_per_s"]:.2f}x',
            )


def print_row(label: str, r: dict[str, float], peak: float, vs: str) -> None:
    """One line of the table."""
    share = f'{r["flops_per_s"] / peak:.1%}' if peak else 'n/a'
    print(
        f'{label:<34}{r["tokens_per_s"]:>12.0f}{r["step_s"]:>9.3f}{r["flops_per_s"] / 1e12:>10.3f}'
        f'{share:>10}{r["peak_gib"]:>10.2f}{vs:>9}'
    )


if __name__ == '__main__':
    main()
