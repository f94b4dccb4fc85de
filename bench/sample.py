"""Sampling throughput on CPU at the cdcd-tiny and cdcd-5m shapes, measured side by side.

    python bench/sample.py                  # batch 16 x 128 tokens, 2 threads, 30522-token vocabulary

Rows: Euler 200 steps and Heun 100 steps (about the same number of model evaluations), with
half-length prompts, guidance off (g = 1: one pass per evaluation) and on (g = 2: an extra
unconditional pass). Randomly initialised weights: speed does not depend on training.
Self-conditioning is on, as in the recipe; it adds no model calls.

    python bench/sample.py --quality runs/cdcd-tiny/export    # quality against network evaluations

`--quality EXPORT` samples a trained model instead: for each solver at 10, 25, 50, 100 and 200
network evaluations per sample (denoiser passes, the final argmax pass included), 64
unconditional samples at the run's score temperature (`--tau`, default the demo's 0.7, seed
0): the share of sentences the corpus grammar recognises (synthetic data), distinct-2, the
unigram entropy of the samples, and seconds per sample.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cdcd_composer.data.grammar import recognised_fraction  # noqa: E402
from cdcd_composer.evaluation import diversity  # noqa: E402
from cdcd_composer.model import CDCDConfig, CDCDTransformer  # noqa: E402
from cdcd_composer.sampler import SOLVERS, SamplerSettings, network_evaluations, sample  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(config: str, vocab_size: int) -> CDCDTransformer:
    """The denoiser of a YAML's model section, with the given vocabulary."""
    with open(os.path.join(REPO, config)) as f:
        model = yaml.safe_load(f)['model']
    model['vocab_size'] = vocab_size
    return CDCDTransformer(CDCDConfig(**model)).eval()


def seconds(
    model: CDCDTransformer, steps: int, settings: SamplerSettings, batch: int, seq_len: int, timed: int
) -> float:
    """Wall seconds of one prompted sampling call of `steps` steps (after a 2-step warm-up).

    Every step costs the same, so `timed` steps are timed and the time scaled to `steps`.
    """
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[:, : seq_len // 2] = False  # Half-length prompts (the tokens themselves do not matter).
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    kwargs = {'given_tokens': tokens, 'generate_mask': mask}
    timesteps = lambda n: torch.logspace(math.log10(300.0), 0.0, n + 1)  # noqa: E731
    sample(model, timesteps(2), batch, seq_len, settings, **kwargs)
    timed = min(timed, steps)
    start = time.perf_counter()
    sample(model, timesteps(timed), batch, seq_len, settings, **kwargs)
    return (time.perf_counter() - start) * steps / timed


def steps_for(solver: str, evaluations: int) -> int:
    """The solver steps that make `evaluations` network evaluations per sample (at most)."""
    return max(1, evaluations // 2 if solver == 'heun' else evaluations - 1)


def quality(export: str, taus: list[float], samples: int, seed: int, counts: list[int]) -> None:
    """Prints recognised sentences, distinct-2 and seconds per sample for each solver and budget."""
    from cdcd_composer.checkpoints.loading import load_trained_model

    model = load_trained_model(export)
    synthetic = model.spec.data.source == 'synthetic'
    print(f'{export}: {samples} unconditional samples, seed {seed}, self-conditioning '
          f'{model.spec.self_conditioned}')  # fmt: skip
    print(f'{"solver":<13}{"tau":>5}{"NFE":>6}{"steps":>7}{"recognised":>12}{"distinct-2":>12}{"H(unigram)":>12}'
          f'{"s/sample":>10}')  # fmt: skip
    for tau in taus:
        for solver in SOLVERS:
            for evaluations in counts:
                settings = SamplerSettings(solver=solver, score_temperature=tau,
                                           self_conditioning=model.spec.self_conditioned)  # fmt: skip
                steps = steps_for(solver, evaluations)
                start = time.perf_counter()
                texts = model.generate(samples, steps, settings, seed=seed)
                per_sample = (time.perf_counter() - start) / samples
                tokenizer = model.spec.text_tokenizer
                ids = [tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts]
                stats = diversity(ids)
                recognised = f'{recognised_fraction(texts):.1%}' if synthetic else '-'
                nfe = network_evaluations(settings, steps)
                head = f'{solver:<13}{tau:>5.2f}{nfe:>6}{steps:>7}{recognised:>12}'
                print(
                    f'{head}{stats["distinct_2"]:>12.3f}{stats["entropy_pooled"]:>12.3f}{per_sample:>10.3f}'
                )


def main() -> None:
    """Prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--configs', nargs='+', default=['yamls/cdcd-tiny.yaml', 'yamls/cdcd-5m.yaml'])
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--vocab_size', type=int, default=30522)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--timed_steps', type=int, default=20, help='steps actually timed per row (then scaled)')
    p.add_argument(
        '--quality', metavar='EXPORT', default=None, help='quality vs network evaluations of a model'
    )
    p.add_argument('--tau', type=float, nargs='+', default=[0.7], help='score temperatures (--quality)')
    p.add_argument('--samples', type=int, default=64, help='samples per row (--quality)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--evaluations', type=int, nargs='+', default=[10, 25, 50, 100, 200])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quality:
        quality(args.quality, args.tau, args.samples, args.seed, args.evaluations)
        return
    solvers = [('Euler', 200, False), ('Heun', 100, True)]
    print(f'batch {args.batch} x {args.seq_len}, vocabulary {args.vocab_size}, {args.threads} threads, '
          f'{args.timed_steps} steps timed per row and scaled to the full count')  # fmt: skip
    print(f'{"model":<10}{"solver":<12}{"guidance":<22}{"seconds":>9}{"seq/s":>8}{"vs off":>8}')
    for config in args.configs:
        model = build(config, args.vocab_size)
        name = os.path.basename(config).removesuffix('.yaml')
        for solver, steps, heun in solvers:
            off = SamplerSettings(heun=heun, self_conditioning=True)  # g = 1: no unconditional pass.
            on = SamplerSettings(heun=heun, self_conditioning=True, guidance_scale=2.0)
            base = None
            for label, settings in (('off (g=1, prompted)', off), ('on (g=2, prompted)', on)):
                s = seconds(model, steps, settings, args.batch, args.seq_len, args.timed_steps)
                base = base or s
                row = f'{name:<10}{f"{solver} {steps}":<12}{label:<22}'
                print(f'{row}{s:>9.2f}{args.batch / s:>8.2f}{s / base:>8.2f}')


if __name__ == '__main__':
    main()
