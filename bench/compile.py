"""torch.compile through the Composer path (`compile_config: {}`), in the launch-bound regime on the CPU.

    python bench/compile.py                          # cdcd-140m's structure at a tiny width
    python bench/compile.py --configs cdcd-5m cdcd-140m --batches 50
    python bench/compile.py --compile_config '{"mode": "max-autotune-no-cudagraphs"}'

For each YAML (at bench/overhead.py's tiny width, 1 process, fp32, 1 thread) it trains the same
`--batches` batches eagerly and compiled (`compile_config`, default `{}`), with the YAML's
self-conditioning and masks, on the offline corpus (`--data_root`, default data/synthetic), with the time warp
refitted every 10 batches so that refitted warps are installed during the run. It prints:
- graph breaks inside the denoiser's forward (`torch._dynamo.explain`, for the training pass,
  self-conditioning's pass and a sampling pass);
- compiled graphs, and recompiles after warm-up: graphs compiled after the first batch in which
  both the training pass and self-conditioning's no-grad pass have run (each needs its own
  graph, as grad mode is part of the guards), with dynamo's reasons;
- compile time: the extra seconds of the batches in which something was compiled;
- eager and compiled s/batch (mean over the batches after warm-up) and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import overhead  # noqa: E402

WARM_UP_BATCHES = 5  # eager rows: batches not timed


def graph_breaks(config: str) -> int:
    """Graph breaks of the YAML's denoiser (tiny width) in a training, self-conditioning and sampling call."""
    from cdcd_composer.composer_model import CDCDComposerModel
    from cdcd_composer.config import load_config, parse_config

    cfg = parse_config(load_config(config, [f'model.{k}={v}' for k, v in overhead.WIDTHS.items()]))
    model_cfg = {**vars(cfg.model), 'vocab_size': overhead.VOCAB}
    model = CDCDComposerModel(
        model_cfg, t_min=cfg.diffusion.t_min, t_max=cfg.diffusion.t_max, masking=cfg.masking
    )
    batch = model.corrupt(
        {'tokens': torch.randint(0, overhead.VOCAB, (overhead.MICROBATCH, overhead.SEQ_LEN))}
    )
    args = (batch['tokens'], batch['t'], batch['generate_mask'], batch['self_cond'])
    breaks = 0
    for kwargs in ({'noise': batch['noise']}, {'noise': batch['noise'], 'expected_embedding': True},
                   {'x_t': batch['noise'], 'expected_embedding': True}):  # fmt: skip
        breaks += torch._dynamo.explain(model.model)(*args, **kwargs).graph_break_count
    return breaks


def train_row(config: str, data_root: str, batches: int, compile_config: str | None) -> dict:
    """Trains `batches` batches through `train.py`'s Trainer; per-batch seconds and compile counts."""
    from composer.core import Callback
    from torch._dynamo import utils as dynamo_utils

    from cdcd_composer.commands import train
    from cdcd_composer.config import load_config

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    dynamo_utils.guard_failures.clear()
    record = {'seconds': [], 'graphs': [], 'self_conditioned': []}

    class Recorder(Callback):
        """Per batch: wall time, compiled graphs so far, and whether the batch self-conditioned."""

        def batch_start(self, state, logger) -> None:
            self.start, self.heads = time.perf_counter(), False

        def before_forward(self, state, logger) -> None:
            self.heads |= bool(state.batch['self_cond'].flatten(1).any(-1).any())

        def batch_end(self, state, logger) -> None:
            record['seconds'].append(time.perf_counter() - self.start)
            record['graphs'].append(dynamo_utils.counters['stats']['unique_graphs'])
            record['self_conditioned'].append(self.heads)

    refit = {'interval': '10ba', 'buffer_size': 512, 'min_points': 128, 'min_evidence': 0.0}
    extra = [f'callbacks.time_warp_refit.{key}={value}' for key, value in refit.items()]
    if compile_config is not None:
        extra.append(f'compile_config={compile_config}')
    cfg = load_config(config, overhead.trainer_overrides(data_root, batches, 1, extra))
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    trainer.state.callbacks.append(Recorder())
    trainer.fit()
    from cdcd_composer.callbacks.time_warp_refit import TimeWarpRefit

    record['refits'] = sum(c.fit_count for c in trainer.state.callbacks if isinstance(c, TimeWarpRefit))
    record['reasons'] = [reason for reasons in dynamo_utils.guard_failures.values() for reason in reasons]
    return record


def summarise(eager: dict, compiled: dict) -> dict:
    """Warm-up, recompiles after it, compile time and the two step times."""
    # Warm-up ends with the first batch that ran both kinds of pass (training and no-grad).
    warm = next(
        (i for i, heads in enumerate(compiled['self_conditioned']) if heads), len(compiled['graphs']) - 1
    )
    graphs = compiled['graphs']
    steady = [s for i, s in enumerate(compiled['seconds']) if i > warm and graphs[i] == graphs[i - 1]]
    compiled_step = statistics.mean(steady)
    compiling = [i for i, g in enumerate(graphs) if g > (graphs[i - 1] if i else 0)]
    eager_step = statistics.mean(eager['seconds'][WARM_UP_BATCHES:])
    return {
        'warm_up': warm + 1,
        'graphs': graphs[-1],
        'recompiles_after': graphs[-1] - graphs[warm],
        'compile_seconds': sum(compiled['seconds'][i] - compiled_step for i in compiling),
        'eager': eager_step,
        'compiled': compiled_step,
        'reasons': compiled['reasons'],
        'refits': compiled['refits'],
    }


def main() -> None:
    """Prints one row per config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--configs', nargs='+', default=['cdcd-140m'])
    p.add_argument('--batches', type=int, default=50)
    p.add_argument('--data_root', default=os.path.join(REPO, 'data', 'synthetic'))
    p.add_argument('--compile_config', default='{}', help="the compiled row's compile_config (JSON)")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.data_root, 'cdcd_dataset.json')):
        sys.exit(f'no converted dataset at {args.data_root}; run: python data_prep/convert_tinystories.py '
                 f'--source synthetic --out_root {args.data_root}')  # fmt: skip
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location('bench_train', os.path.join(REPO, 'bench', 'train.py'))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)

    print(
        f'CPU, 1 thread, fp32, 1 process; tiny width {overhead.WIDTHS}, {args.batches} batches of '
        f'{overhead.MICROBATCHES} microbatches of {overhead.MICROBATCH} x {overhead.SEQ_LEN} tokens'
    )
    header = ('config', 'graph breaks', 'refits', 'graphs', 'warm-up ba', 'recompiles after', 'compile s',
              'eager s/ba', 'compiled s/ba', 'speed-up')  # fmt: skip
    print(' | '.join(header))
    data_root = args.data_root
    for name in args.configs:
        path = bench_train.config_path(name)
        breaks = graph_breaks(path)
        eager = train_row(path, data_root, args.batches, compile_config=None)
        result = summarise(eager, train_row(path, data_root, args.batches, args.compile_config))
        r = result
        cells = [name, breaks, r['refits'], r['graphs'], r['warm_up'], r['recompiles_after'],
                 f'{result["compile_seconds"]:.1f}', f'{result["eager"]:.3f}', f'{result["compiled"]:.3f}',
                 f'{result["eager"] / result["compiled"]:.2f}x']  # fmt: skip
        print(' | '.join(map(str, cells)), flush=True)
        for reason in result['reasons']:
            print(f'  recompile: {reason}')


if __name__ == '__main__':
    main()
