"""eval.py's report: validation CE against t, the likelihood bound, and samples beside real text.

`evaluate` builds it (a dict, JSON-ready) and `markdown` prints it; `cdcd_composer.commands.evaluate`
is the command line around them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from cdcd_composer.data.grammar import recognised_fraction, story_log_probability
from cdcd_composer.data.metadata import DatasetMetadata, check_tokenizer
from cdcd_composer.diffusion import EVAL_NOISE_LEVELS, CDCDDiffusion
from cdcd_composer.evaluation import Judge, cross_entropy_curve, diversity, unigram_entropy
from cdcd_composer.sampler import DEFAULT_STEPS, decode_samples


def validation_tokens(
    model: CDCDDiffusion, data_root: str, local_cache: str | None, limit: int
) -> torch.Tensor:
    """Up to `limit` validation examples (n, L), in order; checks the data matches the model."""
    # Streaming reads the shards; the report's other users (the model card) need not import it.
    from cdcd_composer.data.loaders import build_dataloader, check_canvas, check_split, fetch_dataset_files

    encodings = check_split(data_root, 'val')
    meta = DatasetMetadata.load(fetch_dataset_files(data_root, local_cache))
    check_canvas(data_root, 'val', encodings, meta.seq_len, meta.token_dtype)
    seq_len = model.spec.data.seq_len
    if meta.vocab_size != model.config.vocab_size or meta.seq_len != seq_len:
        raise ValueError(
            f'{data_root} has vocabulary {meta.vocab_size} and {meta.seq_len}-token examples; the model '
            f'expects {model.config.vocab_size} and {seq_len}: use the data it was trained on'
        )
    check_tokenizer(meta, model.spec.text_tokenizer, "the model's tokenizer", data_root)
    loader = build_dataloader(
        data_root, 'val', 64, shuffle=False, seed=0, local_cache=local_cache, drop_last=False
    )
    rows, total = [], 0
    for batch in loader:
        rows.append(batch['tokens'])
        total += len(batch['tokens'])
        if total >= limit:
            break
    return torch.cat(rows)[:limit]


def prompt_canvases(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-length prefix prompts: the first half of each story (up to its end token) is given."""
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for row, seq in enumerate(tokens.tolist()):
        length = seq.index(eos_id, 1) if eos_id in seq[1:] else len(seq)
        mask[row, : max(1, length // 2)] = False
    return tokens, mask


def measure(
    texts: list[str], model: CDCDDiffusion, judge: Judge | None, prefixes: list[str] | None = None
) -> dict[str, Any]:
    """Every sample metric for a list of texts (prefixes: judge scores only what follows them)."""
    sequences = [model.spec.text_tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts]
    row: dict[str, Any] = {'n': len(texts), 'tokens_per_text': sum(map(len, sequences)) / max(len(texts), 1)}
    if judge is not None:
        score = judge.score(texts, prefixes)
        row |= {'judge_nll': score.nll, 'judge_ppl': score.perplexity}
    row |= diversity(sequences)
    if model.spec.data.source == 'synthetic':
        row['recognised'] = recognised_fraction(texts)
    return row


def likelihood(
    model: CDCDDiffusion, val: torch.Tensor, samples: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """The NLL bound over the validation canvases, the unigram baseline and (synthetic) the exact entropy.

    Per token means per non-pad token: sums over canvases divided by their non-pad tokens. The
    standard errors are of the mean over canvases (the bound's noise and the canvases' spread).
    """
    start = time.perf_counter()
    totals = torch.cat([
        model.nll_bound(batch, samples, seed=seed + i).total for i, batch in enumerate(val.split(batch_size))
    ])  # fmt: skip
    seconds = time.perf_counter() - start
    counted = (val != model.spec.data.pad_id).sum(-1).double()
    n, tokens = len(val), float(counted.sum())
    canvas_se = float(totals.std()) / math.sqrt(n) if n > 1 else math.nan
    result = {
        'canvases': n, 'samples': samples, 'seconds': seconds,
        'bound_per_token': float(totals.sum()) / tokens, 'bound_per_token_se': canvas_se * n / tokens,
        'bound_per_canvas': float(totals.mean()), 'bound_per_canvas_se': canvas_se,
        'unigram_entropy': unigram_entropy([row[row != model.spec.data.pad_id].tolist() for row in val])[0],
    }  # fmt: skip
    if model.spec.data.source == 'synthetic':
        result['exact_entropy'] = exact_entropy(model, val, counted)
    return result


def exact_entropy(model: CDCDDiffusion, val: torch.Tensor, counted: torch.Tensor) -> float | None:
    """-ln P of the canvases under the corpus grammar, nats per non-pad token.

    None unless every canvas is a whole story that the tokenizer round-trips (then P(canvas) =
    P(story): the canvas is the story's only encoding).
    """
    tokenizer, eos = model.spec.text_tokenizer, model.spec.data.eos_id
    total = 0.0
    for row, text in zip(val.tolist(), decode_samples(val, tokenizer, eos)):
        end = row.index(eos, 1) if eos in row[1:] else None
        if end is None or tokenizer(text, add_special_tokens=False)['input_ids'] != row[1:end]:
            return None
        total -= story_log_probability(text)
    return total / float(counted.sum()) if math.isfinite(total) else None


def likelihood_lines(result: dict[str, Any]) -> list[str]:
    """The report's `NLL bound:`, `exact entropy:` and `unigram entropy:` lines."""
    r = result
    lines = [
        f'NLL bound: {r["bound_per_token"]:.4f} nats/token ({r["bound_per_token"] / math.log(2):.4f} '
        f'bits/token) +- {r["bound_per_token_se"]:.4f}; {r["bound_per_canvas"]:.2f} +- '
        f'{r["bound_per_canvas_se"]:.2f} nats/canvas ({r["canvases"]} validation canvases, '
        f'{r["samples"]} draws of t each, {r["seconds"]:.0f} s)'
    ]
    if 'exact_entropy' in r:
        exact = r['exact_entropy']
        lines.append(
            'exact entropy: unavailable (a canvas is truncated or not round-tripped by the tokenizer)'
            if exact is None
            else f'exact entropy: {exact:.4f} nats/token (-ln P of these canvases under the corpus grammar)'
        )
    lines.append(
        f'unigram entropy: {r["unigram_entropy"]:.4f} nats/token (of the validation tokens: a baseline)'
    )
    return lines


def evaluate(
    model: CDCDDiffusion,
    data_root: str,
    *,
    local_cache: str | None = None,
    judge: Judge | None = None,
    num_samples: int = 32,
    steps: tuple[int, ...] | None = None,
    taus: tuple[float, ...] | None = None,
    solver: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    nll_samples: int = 16,
    nll_canvases: int = 1000,
) -> dict[str, Any]:
    """The full report: CE curve, the likelihood bound, data figures, one row per (kind, steps, tau).

    Unset, `steps`, `taus` and `solver` are the model's own: (6, 24), (1.0, 0.9) and DPM-Solver++(2M),
    or a distilled student's count, temperature and solver (which has no likelihood bound).
    """
    spec = model.spec
    student = model.config.target_time
    steps = steps or ((spec.default_steps,) if student else (DEFAULT_STEPS // 4, DEFAULT_STEPS))
    taus = taus or ((spec.default_tau,) if student else (1.0, 0.9))
    nll_samples = 0 if student else nll_samples
    val = validation_tokens(model, data_root, local_cache, max(num_samples, 4 * batch_size, nll_canvases))
    if len(val) < num_samples:  # each sample row is scored against (and prompted by) a real story
        raise ValueError(
            f'--num_samples {num_samples} is more than the {len(val)} validation stories in {data_root}; '
            f'use at most {len(val)}'
        )
    levels = sorted({*(t for t in EVAL_NOISE_LEVELS if spec.t_min < t < spec.t_max), spec.t_min, spec.t_max})
    curve = cross_entropy_curve(model, val[: max(num_samples, 4 * batch_size)].split(batch_size), levels)
    tokenizer, eos = model.spec.text_tokenizer, model.spec.data.eos_id
    real = decode_samples(val[:num_samples], tokenizer, eos)
    given, mask = prompt_canvases(val[:num_samples], eos)
    prompts = decode_samples(torch.where(mask, torch.full_like(given, eos), given), tokenizer, eos)
    report: dict[str, Any] = {
        'cross_entropy_vs_t': {str(t): ce for t, ce in curve.items()},
        'likelihood': nll_samples
        and likelihood(model, val[:nll_canvases], nll_samples, batch_size, seed)
        or None,
        'rows': [
            {'kind': 'data', **measure(real, model, judge)},
            {'kind': 'data (2nd half given 1st)', **measure(real, model, judge, prompts)},
        ],
    }
    for n_steps in steps:
        for tau in taus:
            for kind in ('unconditional', 'prompted'):
                prompted = kind == 'prompted'
                settings = model.sampling_settings(solver=solver, tau=tau)
                texts, seconds = timed(
                    model.generate, num_samples, n_steps, settings, given=(given, mask) if prompted else None,
                    seed=seed, batch_size=batch_size,
                )  # fmt: skip
                row = {'kind': kind, 'steps': n_steps, 'tau': tau, 'seconds': seconds}
                row |= measure(texts, model, judge, prompts if prompted else None) | {'examples': texts[:3]}
                report['rows'].append(row)
    return report


def timed(work: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """`work(*args, **kwargs)`'s result and the seconds it took."""
    start = time.perf_counter()
    return work(*args, **kwargs), time.perf_counter() - start


COLUMNS = (
    ('judge_nll', 'judge NLL', '{:.3f}'),
    ('judge_ppl', 'judge ppl', '{:.1f}'),
    ('entropy_pooled', 'H pooled', '{:.2f}'),
    ('entropy_per_seq', 'H per seq', '{:.2f}'),
    ('distinct_1', 'dist-1', '{:.3f}'),
    ('distinct_2', 'dist-2', '{:.3f}'),
    ('distinct_3', 'dist-3', '{:.3f}'),
    ('repetition_4', 'rep-4', '{:.3f}'),
    ('tokens_per_text', 'tokens', '{:.0f}'),
    ('recognised', 'recognised', '{:.1%}'),
)


def markdown(report: dict[str, Any]) -> str:
    """The report as two Markdown tables."""
    curve = report['cross_entropy_vs_t']
    lines = ['| t | ' + ' | '.join(curve) + ' |', '|---|' + '---|' * len(curve)]
    lines.append('| val CE (nats/token) | ' + ' | '.join(f'{v:.3f}' for v in curve.values()) + ' |')
    columns = [c for c in COLUMNS if any(c[0] in row for row in report['rows'])]
    lines += ['', '| samples | steps | tau | ' + ' | '.join(c[1] for c in columns) + ' |']
    lines.append('|---|---|---|' + '---|' * len(columns))
    for row in report['rows']:
        cells = [
            fmt.format(row[key]) if key in row and not _isnan(row[key]) else '' for key, _, fmt in columns
        ]
        lines.append(
            f'| {row["kind"]} | {row.get("steps", "")} | {row.get("tau", "")} | ' + ' | '.join(cells) + ' |'
        )
    if report.get('likelihood'):
        lines += ['', *likelihood_lines(report['likelihood'])]
    return '\n'.join(lines)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
