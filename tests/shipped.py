"""The shipped YAMLs shrunk in size only, for tests that run them as a user would.

`shrunk_overrides` reads the YAML file itself and returns dotted overrides that change sizes
and nothing else: widths (depth kept at 2 or more), batch and microbatch, intervals, durations
and half-lives, sample counts, worker counts, and the dataset (a small one, so its vocabulary
and canvas are small). Every algorithm, callback, logger, the parallelism and the checkpoint
format stay as the YAML ships them; paths stay relative, so a run in `cwd` writes `runs/...`
there. Two changes that are not sizes: `amp_*` precision becomes fp32, which is all a CPU
runs under Composer, and `compile_config` becomes null, since compiling on a CPU costs minutes
per graph (tests/test_compile.py runs a compiled recipe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SHIPPED = ('cdcd-tiny', 'cdcd-char', 'cdcd-5m', 'cdcd-140m', 'cdcd-tiny-distill')
WIDTHS = {'d_embed': 16, 'd_model': 32, 'n_heads': 2, 'd_time': 16, 'n_fourier': 8}

# The run every shrunk recipe does: evaluations at 2, 4, 6, checkpoints at 3 and 6.
BATCHES, EVAL_EVERY, SAVE_EVERY = 6, 2, 3


def shipped_yaml(name: str) -> dict[str, Any]:
    """The YAML as a plain dict (before interpolation)."""
    return yaml.safe_load((Path(__file__).resolve().parents[1] / 'yamls' / f'{name}.yaml').read_text())


def shrunk_overrides(
    name: str,
    data_root: Path,
    folder: Path | None = None,
    *,
    batches: int = BATCHES,
    eval_every: int = EVAL_EVERY,
    save_every: int = SAVE_EVERY,
) -> list[str]:
    """Dotted overrides that make `yamls/{name}.yaml` tiny without changing what it runs.

    The one way the tests shrink a YAML. `batches` long, evaluating every `eval_every` and saving
    every `save_every` batches. With `folder`, the run writes there (checkpoints/, logs-{rank}.txt,
    the warp plot, export/) instead of the YAML's `runs/...` relative to the working directory.
    """
    cfg = shipped_yaml(name)
    out = [f'variables.data_root={data_root}']
    out += [f'model.{key}={value}' for key, value in WIDTHS.items()]
    out.append(f'model.n_layers={min(cfg["model"]["n_layers"], 2)}')
    out += [
        'global_train_batch_size=8', 'device_eval_batch_size=8', f'max_duration={batches}ba',
        f'eval_interval={eval_every}ba', 'eval_subset_num_batches=1', f'save_interval={save_every}ba',
        'scheduler.t_warmup=2ba', f'data.num_workers={min(cfg["data"].get("num_workers", 0), 1)}',
    ]  # fmt: skip
    if isinstance(cfg.get('device_train_microbatch_size'), int):
        out.append('device_train_microbatch_size=2')  # Gradient accumulation stays: 4 or 2 microbatches.
    if str(cfg.get('precision')).startswith('amp'):
        out.append('precision=fp32')
    if cfg.get('compile_config') is not None:
        out.append('compile_config=null')
    if (cfg.get('algorithms') or {}).get('ema'):
        out.append('algorithms.ema.half_life=4ba')
    callbacks = cfg.get('callbacks') or {}
    if 'time_warp_refit' in callbacks:
        refit = {'interval': '2ba', 'buffer_size': 64, 'n_bins': 8, 'min_points': 16}
        out += [f'callbacks.time_warp_refit.{key}={value}' for key, value in refit.items()]
    if 'training_samples' in callbacks:
        out += [
            f'callbacks.training_samples.interval={save_every}ba',
            'callbacks.training_samples.steps=2',
            'callbacks.training_samples.num_samples=2',
        ]
    if 'speed_monitor' in callbacks:
        out.append('callbacks.speed_monitor.window_size=2')
    if folder is not None:
        out += [f'save_folder={folder}/checkpoints', f'loggers.file.filename={folder}/logs-{{rank}}.txt']
        out += [f'callbacks.time_warp_refit.plot_folder={folder}'] if 'time_warp_refit' in callbacks else []
        out += [f'callbacks.export_weights.folder={folder}/export'] if 'export_weights' in callbacks else []
    return out
