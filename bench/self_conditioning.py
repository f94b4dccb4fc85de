"""Training-step time with self-conditioning at p = 0, 0.5 and 1, through Composer, in one run.

python bench/self_conditioning.py            # cdcd-tiny and cdcd-5m shapes, 2 threads, fp32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import yaml
from composer import Trainer
from composer.core import Callback
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cdcd_composer.algorithms.self_conditioning import SelfConditioning  # noqa: E402
from cdcd_composer.composer_model import CDCDComposerModel  # noqa: E402


class StepTimer(Callback):
    """Wall time of every batch after the first `warmup`."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def batch_start(self, state, logger) -> None:
        """Starts the clock."""
        self._start = time.perf_counter()

    def batch_end(self, state, logger) -> None:
        """Records the step once warm."""
        if int(state.timestamp.batch) > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def step_time(config: str, p: float, vocab_size: int, batch_size: int, seq_len: int, steps: int) -> float:
    """Median seconds per training step of `config`'s model with SelfConditioning(p)."""
    with open(os.path.join('yamls', f'{config}.yaml')) as f:
        model_cfg = yaml.safe_load(f)['model']
    torch.manual_seed(0)
    model = CDCDComposerModel(dict(model_cfg, vocab_size=vocab_size))
    tokens = torch.randint(0, vocab_size, (batch_size * (steps + 2), seq_len))
    loader = DataLoader([{'tokens': row} for row in tokens], batch_size=batch_size)
    timer = StepTimer(warmup=2)
    trainer = Trainer(
        model=model, train_dataloader=loader, max_duration=f'{steps + 2}ba',
        optimizers=DecoupledAdamW(model.parameters()),
        algorithms=[SelfConditioning(p)], callbacks=[timer], progress_bar=False, loggers=[], device='cpu',
    )  # fmt: skip
    trainer.fit()
    trainer.close()
    return float(torch.tensor(timer.times).median())


def main() -> None:
    """Prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--configs', nargs='+', default=['cdcd-tiny', 'cdcd-5m'])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--vocab_size', type=int, default=30522)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f'{args.threads} threads, fp32, batch {args.batch_size}x{args.seq_len}, vocab {args.vocab_size}')
    print(f'{"config":<12}{"p=0 (ms)":>12}{"p=0.5 (ms)":>12}{"p=1 (ms)":>12}{"0.5 / 0":>10}{"1 / 0":>10}')
    for config in args.configs:
        t = [
            step_time(config, q, args.vocab_size, args.batch_size, args.seq_len, args.steps)
            for q in (0.0, 0.5, 1.0)
        ]
        cells = [f'{x * 1e3:>12.1f}' for x in t] + [f'{t[1] / t[0]:>10.2f}', f'{t[2] / t[0]:>10.2f}']
        print(f'{config:<12}' + ''.join(cells))


if __name__ == '__main__':
    main()
