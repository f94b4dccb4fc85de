"""CPU training throughput of the shipped configs next to this machine's measured matmul peak.

    python bench/train.py                     # cdcd-tiny and cdcd-5m, 2 threads, fp32
    python bench/train.py --configs cdcd-5m --batch_size 32 --steps 10

Prints one table; all rows are measured in the same run, so the ratios are comparable.
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


def matmul_peak(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """Best-of-`repeats` fp32 FLOP/s of a (size x size) @ (size x size) matmul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def train_throughput(
    config: str, vocab_size: int, batch_size: int, seq_len: int, steps: int
) -> tuple[float, float]:
    """(tokens/s, FLOP/s) of full training steps (forward, backward, AdamW) on random tokens."""
    with open(os.path.join('yamls', f'{config}.yaml')) as f:
        model_cfg = yaml.safe_load(f)['model']
    model_cfg['vocab_size'] = vocab_size
    model = CDCDComposerModel(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {'tokens': torch.randint(0, vocab_size, (batch_size, seq_len))}

    def step() -> None:
        model.loss(model(batch), batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return batch_size * seq_len / seconds, model.flops_per_batch(batch) / seconds


def main() -> None:
    """Prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--configs', nargs='+', default=['cdcd-tiny', 'cdcd-5m'])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--vocab_size', type=int, default=30522, help='bert-base-uncased size')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--steps', type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak(args.threads)
    print(f'threads={args.threads} fp32 batch={args.batch_size}x{args.seq_len} vocab={args.vocab_size}')
    print(f'{"config":<12}{"tokens/s":>12}{"GFLOP/s":>12}{"of matmul peak":>16}')
    print(f'{"matmul 1024":<12}{"":>12}{peak / 1e9:>12.1f}{"100.0%":>16}')
    for config in args.configs:
        torch.set_num_threads(args.threads)
        tokens, flops = train_throughput(config, args.vocab_size, args.batch_size, args.seq_len, args.steps)
        print(f'{config:<12}{tokens:>12.0f}{flops / 1e9:>12.1f}{flops / peak:>15.1%}')


if __name__ == '__main__':
    main()
