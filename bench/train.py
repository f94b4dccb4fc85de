"""Training throughput of the shipped configs against the hardware limit, side by side in one run.

    python bench/train.py                                   # CPU: cdcd-tiny and cdcd-5m, fp32, 2 threads
    python bench/train.py --profile                         # + where one step's time goes
    python bench/train.py --configs cdcd-140m --compile     # GPU: bf16 autocast, eager vs compiled, MFU

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
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if args.device == 'cuda' else 0
    return {
        'tokens_per_s': args.batch_size * args.seq_len / seconds,
        'flops_per_s': model.flops_per_batch(batch) / seconds,
        'step_s': seconds,
        'peak_gib': peak / 2**30,
    }


def run_row(args: argparse.Namespace, config: str, compile: bool) -> dict[str, float]:
    """Runs one row in a fresh interpreter and returns its measurements."""
    cmd = [sys.executable, os.path.abspath(__file__), '--row', config, *sys.argv[1:]]
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
    p.add_argument('--batch_size', type=int, default=None, help='default: 32 on CPU, 64 on GPU')
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--steps', type=int, default=None, help='timed steps (default: 5 on CPU, 30 on GPU)')
    p.add_argument('--compile', action='store_true', help='add torch.compile rows next to eager ones')
    p.add_argument('--profile', action='store_true', help='print the top operators of one step per row')
    p.add_argument('--row', help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == 'cuda'
    args.precision = args.precision or ('amp_bf16' if gpu else 'fp32')
    args.batch_size = args.batch_size or (64 if gpu else 32)
    args.steps = args.steps or (30 if gpu else 5)
    if args.row:
        print(json.dumps(measure_row(args)))
        return
    configs = args.configs or (['cdcd-140m'] if gpu else ['cdcd-tiny', 'cdcd-5m'])
    rows = []
    for config in configs:
        rows += [(config, False)] + ([(config, True)] if args.compile else [])
    peak = gpu_peak(args.precision) if gpu else matmul_peak(args.threads)
    name = torch.cuda.get_device_name() if gpu else f'CPU, {args.threads} threads'
    print(f'{name}, {args.precision}, batch {args.batch_size}x{args.seq_len}, vocab {args.vocab_size}')
    limit = 'MFU' if gpu else 'of matmul'
    print(f'{"row":<34}{"tokens/s":>12}{"step s":>9}{"TFLOP/s":>10}{limit:>10}{"peak GiB":>10}')
    if gpu:
        known = '100.0%' if peak else 'n/a'
        print(f'{"peak (Composer table)":<34}{"":>12}{"":>9}{peak / 1e12:>10.1f}{known:>10}')
    else:
        print(f'{"matmul 1024x1024 fp32":<34}{"":>12}{"":>9}{peak / 1e12:>10.3f}{"100.0%":>10}')
    for config, compile in rows:
        label = os.path.basename(config).removesuffix('.yaml') + (' compiled' if compile else '')
        r = run_row(args, config, compile)
        ratio = f'{r["flops_per_s"] / peak:.1%}' if peak else 'n/a'
        print(
            f'{label:<34}{r["tokens_per_s"]:>12.0f}{r["step_s"]:>9.3f}{r["flops_per_s"] / 1e12:>10.3f}'
            f'{ratio:>10}{r["peak_gib"]:>10.2f}'
        )


if __name__ == '__main__':
    main()
