"""Sampling throughput on CPU at the cdcd-tiny and cdcd-5m shapes, measured side by side.

    python bench/sample.py                  # batch 16 x 128 tokens, 2 threads, 30522-token vocabulary

Rows: Euler 200 steps, Heun 100 steps (about the same number of model evaluations) and the
default sampler (dpmpp_2m, 24 steps), with half-length prompts, guidance off (g = 1: one pass
per evaluation) and on (g = 2: an extra unconditional pass). Randomly initialised weights:
speed does not depend on training. Self-conditioning is on, as in the recipe; it adds no model calls.

    python bench/sample.py --quality runs/cdcd-tiny/export    # quality against network evaluations

`--quality EXPORT` samples a trained model instead: for each solver at 10, 25, 50, 100 and 200
network evaluations per sample (denoiser passes, the final argmax pass included), 64
unconditional samples at the run's score temperature (`--tau`, default the demo's 0.7, seed
0): the share of sentences the corpus grammar recognises (synthetic data), distinct-2, the
unigram entropy of the samples, and seconds per sample. `c` is the time at which each step
evaluates the model (`--eval_times`, as generate.py's `--eval_time`: C for C t; default 1).

    python bench/sample.py --distilled runs/cdcd-tiny-distill/export --teacher runs/cdcd-tiny/export

`--distilled STUDENT --teacher TEACHER`: quality against cost of a distilled student (docs/ablations.md,
"Distillation"): the student at each count it was distilled for (`--evaluations`, default 1 2 4 8)
beside the teacher's default solver at the same counts and at its 25-evaluation default, each at
the student's score temperature, averaged over `--seeds` (64 samples each): recognised sentences,
distinct-2, unigram entropy, the share of distinct samples (a collapse check), the recognised
sentences of samples prompted with "once upon a time", and seconds per sample.

    python bench/sample.py --handover --distilled runs/cdcd-tiny-distill/export \
        --teacher runs/cdcd-tiny/export

`--handover`: where the student loses quality. The teacher samples each seed once; each row
starts the student at the teacher's own state at one of its pass times and lets it finish,
beside the teacher's one-pass argmax from that state (docs/ablations.md, "Distillation").
"""

from __future__ import annotations

import argparse
import itertools
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
from cdcd_composer.sampler import (  # noqa: E402
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    ODE_SOLVERS,
    SamplerSettings,
    network_evaluations,
    sample,
)

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


SCHEDULES = ('warp', 'log', 'edm7', 'edm3', 'even')


def schedule_timesteps(kind: str, model, steps: int) -> torch.Tensor:
    """(steps + 1,) decreasing times from t_max to t_min.

    'warp': the fitted warp's (the default); 'log': evenly spaced in ln t; 'edmR': EDM's
    rho-schedule with rho = R; 'even': evenly spaced in t.
    """
    t_max, t_min = model.spec.t_max, model.spec.t_min
    if kind == 'warp':
        return model.time_warp.sampling_timesteps(steps)
    if kind == 'log':
        return torch.exp(torch.linspace(math.log(t_max), math.log(t_min), steps + 1))
    if kind == 'even':
        return torch.linspace(t_max, t_min, steps + 1)
    rho, i = float(kind[3:]), torch.linspace(0.0, 1.0, steps + 1)
    return (t_max ** (1 / rho) + i * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho


def quality(export: str, args: argparse.Namespace) -> None:
    """Prints recognised sentences, distinct-2 and seconds per sample per solver, schedule, tau and budget."""
    from cdcd_composer.checkpoints.loading import load_trained_model
    from cdcd_composer.sampler import decode_samples, sample_in_batches

    model = load_trained_model(export)
    spec, tokenizer = model.spec, model.spec.text_tokenizer
    synthetic = spec.data.source == 'synthetic'
    print(f'{export}: {args.samples} unconditional samples, seed {args.seed}, self-conditioning '
          f'{spec.self_conditioned}')  # fmt: skip
    print(f'{"solver":<13}{"schedule":>9}{"tau":>5}{"c":>6}{"NFE":>6}{"steps":>7}{"recognised":>12}{"distinct-2":>12}'
          f'{"H(unigram)":>12}{"s/sample":>10}')  # fmt: skip
    for tau in args.tau:
        for solver in args.solvers:
            for kind, where in itertools.product(args.schedules, args.eval_times):
                for evaluations in args.evaluations:
                    settings = SamplerSettings(solver=solver, tau=tau, eval_time=where,
                                               self_conditioning=spec.self_conditioned)  # fmt: skip
                    steps = steps_for(solver, evaluations)
                    start = time.perf_counter()
                    ids = sample_in_batches(model.model, schedule_timesteps(kind, model, steps), args.samples,
                                            spec.data.seq_len, settings, seed=args.seed)  # fmt: skip
                    per_sample = (time.perf_counter() - start) / args.samples
                    texts = decode_samples(ids, tokenizer, spec.data.eos_id)
                    stats = diversity([tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts])
                    recognised = f'{recognised_fraction(texts):.1%}' if synthetic else '-'
                    nfe = network_evaluations(settings, steps)
                    c = settings.eval_time
                    head = f'{solver:<13}{kind:>9}{tau:>5.2f}{c:>6}{nfe:>6}{steps:>7}{recognised:>12}'
                    print(
                        f'{head}{stats["distinct_2"]:>12.3f}{stats["entropy_pooled"]:>12.3f}{per_sample:>10.3f}'
                    )


def measure(model, steps: int, settings: SamplerSettings, samples: int, seed: int) -> dict[str, float]:
    """One row's figures for `model` (a `CDCDComposerModel`) sampled with `settings` at `steps`."""
    from cdcd_composer.prompting import Request

    tokenizer = model.spec.text_tokenizer
    start = time.perf_counter()
    texts = model.generate(samples, steps, settings, seed=seed)
    per_sample = (time.perf_counter() - start) / samples
    prompted = model.generate(samples, steps, settings, seed=seed, request=Request(prompt='once upon a time'))
    stats = diversity([tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts])
    return {
        'recognised': recognised_fraction(texts), 'distinct_2': stats['distinct_2'],
        'entropy': stats['entropy_pooled'], 'distinct_samples': len(set(texts)) / len(texts),
        'prompted': recognised_fraction(prompted), 'seconds': per_sample,
    }  # fmt: skip


def distillation_table(student_path: str, teacher_path: str, args: argparse.Namespace) -> None:
    """Prints the student at its counts beside the teacher at the same counts and its default."""
    from cdcd_composer.checkpoints.loading import load_trained_model

    student, teacher = load_trained_model(student_path), load_trained_model(teacher_path)
    tau = student.spec.default_tau
    recorded = {int(c) for c in student.spec.sampling['timesteps']}
    rows = [('student', student, c, student.sampling_settings()) for c in args.evaluations if c in recorded]
    ode = teacher.sampling_settings(tau=tau)
    teacher_counts = sorted({c for c in args.evaluations if c > 1} | {DEFAULT_STEPS + 1})
    rows += [('teacher', teacher, c, ode) for c in teacher_counts]
    print(f'{student_path} vs {teacher_path}: {args.samples} samples x seeds {args.seeds}, tau {tau:g}; '
          'prompted: "once upon a time"')  # fmt: skip
    columns = (
        'model',
        'solver',
        'NFE',
        'recognised',
        'distinct-2',
        'H(unigram)',
        'distinct samples',
        'prompted',
    )
    print('| ' + ' | '.join(columns) + ' | s/sample |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, model, count, settings in rows:
        steps = count if settings.solver == 'distilled' else count - 1  # an ODE solver's argmax pass
        runs = [measure(model, steps, settings, args.samples, seed) for seed in args.seeds]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        nfe = network_evaluations(settings, steps)
        print(f'| {name} | {settings.solver} | {nfe} | {mean["recognised"]:.1%} | {mean["distinct_2"]:.3f} | '
              f'{mean["entropy"]:.3f} | {mean["distinct_samples"]:.0%} | {mean["prompted"]:.1%} | '
              f'{mean["seconds"]:.3f} |', flush=True)  # fmt: skip


def teacher_states(teacher, grid: torch.Tensor, noise: torch.Tensor, settings: SamplerSettings):
    """The teacher's samples from `noise` and its state before each of its steps: (ids, {step: x})."""
    states: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        ids = sample(teacher.model, grid, len(noise), noise.shape[1], settings, noise=noise,
                     on_state=lambda i, x: states.__setitem__(i, x.clone()))  # fmt: skip
    return ids, states


@torch.no_grad()
def one_pass_argmax(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's argmax tokens from the state x at time t, with no self-conditioning estimate."""
    blank = torch.zeros(x.shape[:2], dtype=torch.long)
    everything = torch.ones_like(blank, dtype=torch.bool)
    return model.model(blank, t.expand(len(x)), everything, torch.zeros_like(x), x_t=x).logits.argmax(-1)


def handover_table(student_path: str, teacher_path: str, args: argparse.Namespace) -> None:
    """Prints where a student loses quality: its remaining passes from the teacher's own states.

    For each seed the teacher samples once (its default solver, the student's tau) and keeps its
    state before every step. Each row starts the student at the teacher's state at one of its pass
    times and lets it finish with its remaining passes, beside the teacher's own one-pass argmax
    from that state. Both start with no self-conditioning estimate, as a first pass does.
    """
    from cdcd_composer.checkpoints.loading import load_trained_model
    from cdcd_composer.sampler import decode_samples

    student, teacher = load_trained_model(student_path), load_trained_model(teacher_path)
    spec, own = teacher.spec, student.sampling_settings()
    grid = teacher.time_warp.sampling_timesteps(DEFAULT_STEPS).float()

    def recognised(ids: torch.Tensor) -> float:
        return recognised_fraction(decode_samples(ids, spec.text_tokenizer, spec.data.eos_id))

    counts = [c for c in args.evaluations if str(c) in student.spec.sampling['timesteps']]
    found: dict[tuple[int, int, int, float], list[tuple[float, float]]] = {}
    full = []
    for seed in args.seeds:
        shape = (args.samples, spec.data.seq_len, teacher.config.d_embed)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        ids, states = teacher_states(teacher, grid, noise, teacher.sampling_settings(tau=own.tau))
        full.append(recognised(ids))
        for count in counts:
            times = student.spec.distilled_timesteps(count).float()
            for k in range(count):
                at = int((grid - times[k]).abs().argmin())
                with torch.no_grad():
                    ids = sample(
                        student.model, times[k:], args.samples, shape[1], own, noise=states[at] / times[k]
                    )
                argmax = one_pass_argmax(teacher, states[at], grid[at])
                found.setdefault((count, k + 1, at, float(times[k])), []).append(
                    (recognised(ids), recognised(argmax))
                )
    finishing = sum(full) / len(full)
    print(f'{student_path} from the states of {teacher_path}: {args.samples} samples x seeds {args.seeds}, '
          f'tau {own.tau:g}; the teacher finishing its {DEFAULT_STEPS} steps: {finishing:.1%}')  # fmt: skip
    print("| NFE | pass | from teacher step | t | the student finishes | the teacher's argmax there |")
    print('|---|---|---|---|---|---|')
    for (count, k, at, t), pairs in found.items():
        done, argmax = (sum(v) / len(v) for v in zip(*pairs))
        print(f'| {count} | {k} | {at} | {t:.2f} | {done:.1%} | {argmax:.1%} |', flush=True)


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
    p.add_argument(
        '--distilled', metavar='STUDENT', default=None, help='a distilled student (with --teacher)'
    )
    p.add_argument('--teacher', metavar='TEACHER', default=None, help="the student's teacher (--distilled)")
    p.add_argument(
        '--handover', action='store_true',
        help="(--distilled) the student's remaining passes from the teacher's own states, pass by pass",
    )  # fmt: skip
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds averaged (--distilled)')
    p.add_argument('--evaluations', type=int, nargs='+', default=[10, 25, 50, 100, 200])
    p.add_argument('--solvers', nargs='+', choices=ODE_SOLVERS, default=list(ODE_SOLVERS), help='(--quality)')
    p.add_argument(
        '--eval_times', nargs='+', default=['1'], metavar='C|next+D',
        help='where each step evaluates the model, as generate.py --eval_time (--quality; default 1)',
    )  # fmt: skip
    p.add_argument(
        '--schedules', nargs='+', choices=SCHEDULES, default=['warp'],
        help="timesteps (--quality): the fitted warp, even in ln t, EDM's rho 7 or 3, even in t",
    )  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.distilled:
        if not args.teacher:
            p.error('--distilled needs --teacher, the export it was distilled from')
        if args.evaluations == p.get_default('evaluations'):
            args.evaluations = [1, 2, 4, 8]
        (handover_table if args.handover else distillation_table)(args.distilled, args.teacher, args)
        return
    if args.quality:
        quality(args.quality, args)
        return
    solvers = [('euler', 200), ('heun', 100), (DEFAULT_SOLVER, DEFAULT_STEPS)]  # the paper's, and the default
    print(f'batch {args.batch} x {args.seq_len}, vocabulary {args.vocab_size}, {args.threads} threads, '
          f'{args.timed_steps} steps timed per row and scaled to the full count')  # fmt: skip
    print(f'{"model":<10}{"solver":<15}{"guidance":<22}{"seconds":>9}{"seq/s":>8}{"vs off":>8}')
    for config in args.configs:
        model = build(config, args.vocab_size)
        name = os.path.basename(config).removesuffix('.yaml')
        for solver, steps in solvers:
            off = SamplerSettings(solver=solver, self_conditioning=True)  # g = 1: no unconditional pass.
            on = SamplerSettings(solver=solver, self_conditioning=True, guidance=2.0)
            base = None
            for label, settings in (('off (g=1, prompted)', off), ('on (g=2, prompted)', on)):
                s = seconds(model, steps, settings, args.batch, args.seq_len, args.timed_steps)
                base = base or s
                row = f'{name:<10}{f"{solver} {steps}":<15}{label:<22}'
                print(f'{row}{s:>9.2f}{args.batch / s:>8.2f}{s / base:>8.2f}')


if __name__ == '__main__':
    main()
