"""Amortised cost of time-warp refitting next to a cdcd-tiny training step, measured in one run.

python bench/time_warp.py            # buffer 4096, 100 bins, refit every 50 batches (cdcd-tiny)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cdcd_composer.composer_model import CDCDComposerModel  # noqa: E402
from cdcd_composer.time_warping import TimeWarp  # noqa: E402


def step_seconds(
    model: CDCDComposerModel, batch: dict, steps: int, optimizer: torch.optim.Optimizer | None = None
) -> float:
    """Mean seconds of one training step (forward, backward, AdamW), after one warm-up step."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.loss(model(batch), batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def refit_seconds(warp: TimeWarp, buffer_size: int, repeats: int) -> float:
    """Mean seconds of one refit on a full buffer of realistic (t, CE) pairs."""
    total = 0.0
    for _ in range(repeats):
        t = warp.sample_t(buffer_size).double()
        loss = 2.3 / (1 + torch.exp(-2 * (t.log() - 2))) + 0.3 * torch.randn_like(t)
        start = time.perf_counter()
        warp.fit(t, loss)
        total += time.perf_counter() - start
    return total / repeats


def main() -> None:
    """Prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--buffer_size', type=int, default=4096)
    p.add_argument('--n_bins', type=int, default=100)
    p.add_argument('--interval', type=int, default=50, help='batches between refits')
    p.add_argument('--vocab_size', type=int, default=666, help='the synthetic corpus tokenizer')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(os.path.join('yamls', 'cdcd-tiny.yaml')) as f:
        raw = yaml.safe_load(f)
    model = CDCDComposerModel(dict(raw['model'], vocab_size=args.vocab_size), t_min=1.0, t_max=50.0)
    batch = {'tokens': torch.randint(0, args.vocab_size, (raw['global_train_batch_size'], 128))}
    step = step_seconds(model, batch, steps=20)
    refit = refit_seconds(TimeWarp(1.0, 50.0, n_bins=args.n_bins), args.buffer_size, repeats=20)
    amortised = refit / args.interval
    print(f'cdcd-tiny, {args.threads} threads, batch {batch["tokens"].shape[0]}x128')
    print(f'{"training step":<36}{step * 1e3:>10.2f} ms')
    print(f'{f"refit ({args.buffer_size} pairs, {args.n_bins} bins)":<36}{refit * 1e3:>10.2f} ms')
    print(f'{f"refit amortised over {args.interval} batches":<36}{amortised * 1e3:>10.3f} ms')
    print(f'{"amortised refit / step":<36}{amortised / step:>10.3%}')


if __name__ == '__main__':
    main()
