"""The logic of generate.py: stories sampled from a trained model (`arguments.generate_parser`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch
from tqdm import tqdm

from cdcd_composer import sampler
from cdcd_composer.arguments import generate_parser
from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.data.grammar import recognised_fraction
from cdcd_composer.outputs import check_output_file, run_command, write_output_file
from cdcd_composer.prompting import Request
from cdcd_composer.sampler import (
    SamplerSettings,
    decode_samples,
    network_evaluations,
    sampling_batch_size,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = generate_parser()
    return p.parse_args(argv)


def requested_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings the command line asks for (None: the model's own), checked for range.

    Raises:
        ValueError: one line naming the flag (`SamplerSettings`), before any model is loaded.
    """
    asked = {
        'solver': args.solver, 'tau': args.tau,
        'initial_noise_scale': args.initial_noise_scale, 'guidance': args.guidance,
        'eval_time': args.eval_time,
        'self_conditioning': {'auto': None, 'on': True, 'off': False}[args.self_conditioning],
    }  # fmt: skip
    SamplerSettings(**{k: v for k, v in asked.items() if v is not None})
    return asked


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: exit 0, or one line and 2 (usage), 1 (failed) or 130 (`run_command`)."""
    args = parse_args(argv)
    return run_command(
        lambda: sample(args), 'while sampling: nothing was printed or written; rerun to sample'
    )


def sample(args: argparse.Namespace) -> int:
    """Samples, prints the samples and their cost, and writes `--out`."""
    if args.out:
        check_output_file(args.out, inputs=[args.model])
    asked = requested_settings(args)
    model = load_trained_model(
        args.model, args.device, warp=args.warp == 'checkpoint', trust=args.trust_checkpoint,
        weights=args.weights,
    )  # fmt: skip
    settings = model.sampling_settings(**asked)
    args.steps = args.steps or model.spec.default_steps
    request = Request(args.prompt, args.template, args.blank_length)
    # Every solver step of every batch, so the bar's rate and time left cover the whole request.
    config = model.config
    size = sampling_batch_size(config.vocab_size, config.d_model, model.spec.data.seq_len)
    batches = math.ceil(args.num_samples / size)
    if batches > 1:  # a long job says so before it starts; the bar then shows its time left
        fit = f'the samples that fit {sampler.SAMPLING_MEMORY / 2**30:g} GiB of activations'
        print(f'sampling {args.num_samples:,} samples in {batches:,} batches of at most {size:,} ({fit})',
              file=sys.stderr)  # fmt: skip
    with tqdm(total=args.steps * batches, desc='sampling', unit='step') as bar:  # closed on any way out
        ids = model.generate_tokens(
            args.num_samples, args.steps, settings, request=request, seed=args.seed,
            on_step=lambda _: bar.update(),
        )  # fmt: skip
    texts = decode_samples(ids, model.spec.text_tokenizer, model.spec.data.eos_id)
    for i, text in enumerate(texts):
        print(f'[{i}] {text}\n')
    guided = settings.guidance != 1.0 and (args.prompt is not None or args.template is not None)
    scaled = '' if settings.eval_time == '1' else f', model evaluated at {settings.evaluated_at()}'
    print(f'network evaluations: {network_evaluations(settings, args.steps, guided)} per sample '
          f'({settings.solver}, {args.steps} steps{scaled})')  # fmt: skip
    if model.spec.data.source == 'synthetic':
        print(f'recognised sentences: {recognised_fraction(texts):.1%} (grammar of the synthetic corpus)')
    if args.out:
        write_samples(args, texts, ids, settings)
    return 0


def write_samples(
    args: argparse.Namespace, texts: list[str], ids: torch.Tensor, settings: SamplerSettings
) -> None:
    """Writes the samples to `--out`: JSON Lines (with the ids and settings) if it ends in .jsonl, else text.

    Raises:
        StorageFault: the write failed (one line; `write_output_file`).
    """
    record = {k: getattr(args, k) for k in ('prompt', 'template', 'steps', 'guidance', 'seed')}
    record |= {
        'tau': settings.tau,
        'solver': settings.solver,
        'eval_time': settings.eval_time,
    }

    def write(f) -> None:
        for i, text in enumerate(texts):
            jsonl = args.out.endswith('.jsonl')
            row = {'text': text, 'index': i, 'ids': ids[i].tolist(), **record}
            f.write(json.dumps(row) + '\n' if jsonl else text + '\n\n')

    write_output_file(args.out, write)
