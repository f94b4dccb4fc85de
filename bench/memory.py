"""Memory per rank of a config's shapes under FSDP2 (full sharding) and DDP, side by side.

    python bench/memory.py                                  # cdcd-140m shapes, 2 ranks, CPU (gloo)
    python bench/memory.py --ranks 8 --batch_size 64        # on a GPU node: 8 GPUs, bf16

Each strategy runs `composer -n RANKS` over a few real training steps (Composer Trainer, fused
decoupled AdamW, random tokens). Per rank it reports the bytes of what each rank holds for
the model (its parameters, gradients and AdamW moments: shards under FSDP2, full copies under
DDP) and the measured memory in use when training starts (after wrapping) and its peak during the steps:
`torch.cuda.memory_allocated` / `max_memory_allocated` on GPU, the resident set size on CPU
(sampled every 5 ms; it includes ~0.5 GiB of imported libraries, the same for both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 2**30


def resident_bytes() -> int:
    """This process's current resident set size (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakResident:
    """Samples the resident set size in a background thread; `peak` is the largest seen."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.peak, self.period_s, self._stop = 0, period_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakResident:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for a tensor (its shard when it is a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, 'to_local') else tensor
    return local.numel() * local.element_size()


def run_rank(args: argparse.Namespace) -> None:
    """One rank of one strategy: trains a few steps and writes its figures as JSON."""
    from composer import Trainer
    from composer.core import Callback
    from composer.utils import dist, get_device
    from torch.utils.data import DataLoader

    from cdcd_composer.composer_model import CDCDComposerModel
    from cdcd_composer.optim import FusedDecoupledAdamW

    gpu = torch.cuda.is_available()
    with open(args.config) as f:
        model_cfg = yaml.safe_load(f)['model']
    model_cfg['vocab_size'] = args.vocab_size
    model = CDCDComposerModel(model_cfg)
    dist.initialize_dist(get_device(None))
    tokens = torch.randint(0, args.vocab_size, (args.batch_size * args.ranks * args.steps, args.seq_len))
    examples = [{'tokens': t} for t in tokens]
    loader = DataLoader(examples, batch_size=args.batch_size, sampler=dist.get_sampler(examples))
    fsdp = {'fsdp': {'mixed_precision': 'PURE' if gpu else 'FULL'}} if args.row == 'fsdp2' else None
    figures: dict[str, float] = {}

    class Measure(Callback):
        def fit_start(self, state, logger) -> None:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            figures['start'] = torch.cuda.memory_allocated() if gpu else resident_bytes()
            self.sampler = PeakResident().__enter__()

        def fit_end(self, state, logger) -> None:
            self.sampler.__exit__()
            peak = torch.cuda.max_memory_allocated() if gpu else self.sampler.peak
            optimizer = state.optimizers[0]
            params = list(state.model.parameters())
            figures['params'] = sum(local_bytes(p) for p in params)
            figures['grads'] = sum(local_bytes(p.grad) for p in params if p.grad is not None)
            moments = [v for s in optimizer.state.values() for v in s.values() if v.ndim]
            figures['adam'] = sum(local_bytes(v) for v in moments)
            figures['peak'] = peak

    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f'{args.steps}ba',
        optimizers=FusedDecoupledAdamW(model.parameters(), lr=1e-4),
        precision='amp_bf16' if gpu else 'fp32',
        parallelism_config=fsdp,
        callbacks=[Measure()],
        progress_bar=False,
    )
    trainer.fit()
    with open(os.path.join(args.out, f'{args.row}-rank{dist.get_global_rank()}.json'), 'w') as f:
        json.dump(figures, f)


def main() -> None:
    """Launches both strategies and prints the table (or, with --row, runs as one rank)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=os.path.join(REPO, 'yamls', 'cdcd-140m.yaml'))
    p.add_argument('--ranks', type=int, default=2)
    p.add_argument('--vocab_size', type=int, default=30522)
    p.add_argument('--batch_size', type=int, default=2, help='per rank (reduced on CPU)')
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--row', help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        run_rank(args)
        return
    launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
    env = dict(os.environ, FSDP_VERSION='2', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (gloo), fp32'
    print(f'{os.path.basename(args.config)} shapes, {args.ranks} ranks, {device}, per-rank batch '
          f'{args.batch_size}x{args.seq_len}, vocab {args.vocab_size}; GiB per rank (rank 0)')  # fmt: skip
    print(f'{"strategy":<10}{"params":>9}{"grads":>9}{"AdamW":>9}{"state":>9}{"at start":>10}{"peak":>9}')
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for row in ('ddp', 'fsdp2'):
            cmd = [launcher, '-n', str(args.ranks), os.path.abspath(__file__), *sys.argv[1:], '--row', row]
            proc = subprocess.run([*cmd, '--out', out], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f'{row} failed:\n{proc.stderr[-3000:]}')
            with open(os.path.join(out, f'{row}-rank0.json')) as f:
                r = results[row] = json.load(f)
            state = r['params'] + r['grads'] + r['adam']
            print(
                f'{row:<10}{r["params"] / GIB:>9.3f}{r["grads"] / GIB:>9.3f}{r["adam"] / GIB:>9.3f}'
                f'{state / GIB:>9.3f}{r["start"] / GIB:>10.3f}{r["peak"] / GIB:>9.3f}'
            )
    print(f'FSDP2 / DDP peak: {results["fsdp2"]["peak"] / results["ddp"]["peak"]:.2f}')


if __name__ == '__main__':
    main()
