"""Samples stories from a trained checkpoint: `python generate.py CHECKPOINT --num_samples 8 --steps 200`."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from cdcd_composer.checkpoint import load_trained_model
from cdcd_composer.grammar import recognised_fraction
from cdcd_composer.sampler import decode_samples, euler_sample


def generate(
    checkpoint: str,
    num_samples: int = 8,
    steps: int = 200,
    seed: int = 0,
    tau: float = 1.0,
    self_conditioning: bool | None = None,
    progress: bool = False,
    warp: bool = True,
) -> tuple[list[str], str]:
    """Unconditional samples decoded to text (cut at the end-of-story token), and the data source."""
    trained = load_trained_model(checkpoint, warp=warp)
    bar = tqdm(total=steps, desc='sampling', disable=not progress)
    tokens = euler_sample(
        trained.model,
        trained.time_distribution.sampling_timesteps(steps),
        num_samples,
        trained.seq_len,
        self_conditioning=trained.self_conditioned if self_conditioning is None else self_conditioning,
        score_temperature=tau,
        generator=torch.Generator().manual_seed(seed),
        on_step=lambda _: bar.update(),
    )
    bar.close()
    return decode_samples(tokens, trained.tokenizer, trained.eos_id), trained.source


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('checkpoint', help='local path or s3:// URI of a checkpoint written by train.py')
    p.add_argument('--num_samples', type=int, default=8)
    p.add_argument('--steps', type=int, default=200, help='Euler steps')
    p.add_argument('--tau', type=float, default=1.0, help='score temperature')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--self_conditioning', choices=('auto', 'on', 'off'), default='auto',
        help='feed the previous x0_hat back (auto: if the checkpoint was trained with it)',
    )  # fmt: skip
    p.add_argument('--out', default=None, help='write samples as JSONL here')
    p.add_argument(
        '--warp', choices=('checkpoint', 'none'), default='checkpoint',
        help="timesteps from the checkpoint's fitted time warp, or evenly spaced in t ('none')",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.num_samples <= 0 or args.steps <= 0:
        p.exit(2, 'error: --num_samples and --steps must be positive\n')
    try:
        texts, source = generate(
            args.checkpoint,
            args.num_samples,
            args.steps,
            args.seed,
            args.tau,
            {'auto': None, 'on': True, 'off': False}[args.self_conditioning],
            progress=True,
            warp=args.warp == 'checkpoint',
        )
    except ValueError as e:
        sys.exit(f'error: {e}')
    for i, text in enumerate(texts):
        print(f'[{i}] {text}\n')
    if source == 'synthetic':
        print(f'recognised sentences: {recognised_fraction(texts):.1%} (grammar of the synthetic corpus)')
    if args.out:
        with open(args.out, 'w') as f:
            for text in texts:
                f.write(json.dumps({'text': text}) + '\n')


if __name__ == '__main__':
    main()
