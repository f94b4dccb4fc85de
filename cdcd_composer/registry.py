"""YAML names of optimizers, schedulers, algorithms, callbacks and loggers, and their builders."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from composer import loggers, optim
from composer.core import Time, TimeUnit
from torch import nn

from cdcd_composer.algorithms import ALGORITHMS
from cdcd_composer.callbacks import CALLBACKS
from cdcd_composer.loggers import AppendingFileLogger
from cdcd_composer.optim import FusedDecoupledAdamW

OPTIMIZERS: dict[str, type] = {
    'decoupled_adamw': optim.DecoupledAdamW,
    'fused_decoupled_adamw': FusedDecoupledAdamW,
    'adamw': torch.optim.AdamW,
    'decoupled_sgdw': optim.DecoupledSGDW,
}
SCHEDULERS: dict[str, type] = {
    'cosine_with_warmup': optim.CosineAnnealingWithWarmupScheduler,
    'linear_decay_with_warmup': optim.LinearWithWarmupScheduler,
    'constant_with_warmup': optim.ConstantWithWarmupScheduler,
}
LOGGERS: dict[str, type] = {
    'file': AppendingFileLogger,  # Composer's, appending (a resumed run keeps its log)
    'tensorboard': loggers.TensorboardLogger,
    'wandb': loggers.WandBLogger,
    'mlflow': loggers.MLFlowLogger,
}
REGISTRIES = {
    'optimizer': OPTIMIZERS,
    'scheduler': SCHEDULERS,
    'algorithms': ALGORITHMS,
    'callbacks': CALLBACKS,
    'loggers': LOGGERS,
}


def lookup(kind: str, name: str) -> type:
    """The class registered as `name` under `kind` ('optimizer', 'callbacks', ...).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    registry = REGISTRIES[kind]
    if name not in registry:
        raise ValueError(f'unknown {kind} {name!r}; valid names: {", ".join(sorted(registry))}')
    return registry[name]


def check_kwargs(kind: str, name: str, kwargs: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Fails by key name when `kwargs` do not fit the registered class's constructor.

    Args:
        kind: Registry kind, e.g. 'callbacks'.
        name: Registered name.
        kwargs: Keyword arguments from the YAML.
        skip: Positional parameters supplied by the builder (e.g. 'params', 'optimizer').
    """
    cls = lookup(kind, name)
    params = [
        p for p in inspect.signature(cls).parameters.values() if p.name not in skip and p.name != 'self'
    ]
    forwarded = getattr(cls, 'warp_settings_of', None)  # A class whose keyword arguments it passes on.
    if forwarded is not None:
        params = [p for p in params if p.kind is not p.VAR_KEYWORD]
        params += [
            p for p in inspect.signature(forwarded).parameters.values() if p.name not in ('t_min', 't_max')
        ]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    valid = {p.name for p in params}
    for key in kwargs:
        if key not in valid and not accepts_any:
            raise ValueError(f'unknown key {kind}.{name}.{key}; valid keys: {", ".join(sorted(valid))}')
    by_name = {p.name: p for p in params}
    for key, value in kwargs.items():
        if key in by_name:
            check_value(f'{kind}.{name}.{key}', value, by_name[key].default)
            check_by_parameter_name(f'{kind}.{name}.{key}', key, value, by_name[key].annotation)
    bound = {p.name for p in params if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
    missing = sorted(bound - set(kwargs) - {p.name for p in params if p.kind is p.VAR_POSITIONAL})
    if missing:
        raise ValueError(f'{kind}.{name} needs key {missing[0]!r}')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(key: str, value: Any, default: Any) -> None:
    """Fails by key name when a value's type cannot be what the parameter's default is.

    The constructors check names, not types: `optimizer.lr=fast` or `nan` would otherwise reach
    the first optimizer step. Numbers must be finite numbers, switches booleans, and sequences
    of numbers (e.g. `betas`) finite numbers throughout.
    """
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f'{key}={value!r} must be true or false')
    elif _is_number(default):
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f'{key}={value!r} must be a finite number (default {default})')
    elif isinstance(default, (tuple, list)) and default and all(_is_number(v) for v in default):
        if not isinstance(value, (tuple, list)) or not all(_is_number(v) and math.isfinite(v) for v in value):
            raise ValueError(f'{key}={value!r} must be a list of finite numbers like {list(default)}')


# Parameters whose name says their range, in every registered class (Composer's and ours).
CHOICES = {'clipping_type': ('adaptive', 'norm', 'value')}


def check_by_parameter_name(key: str, parameter: str, value: Any, annotation: Any = None) -> None:
    """Fails by key name on a value outside what the parameter's name (or annotation) says.

    A parameter annotated with Composer's `Time` (e.g. a scheduler's `t_warmup`) takes a time
    string. `*interval` (a time string or a number of batches) must be a positive duration:
    `0ba` never fires, or fires on every batch. Names with a fixed set of values (`CHOICES`)
    must be one of them.
    """
    if 'Time' in str(annotation) and isinstance(value, str):
        try:
            Time.from_timestring(value)
        except ValueError:
            raise ValueError(
                f'{key}={value!r} is not a Composer time string; write e.g. 500ba or 0.1dur'
            ) from None
    if parameter.endswith('interval') and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            positive = Time.from_input(value, TimeUnit.BATCH).value > 0
        except (ValueError, TypeError):
            raise ValueError(f'{key}={value!r} is not a Composer time string; write e.g. 500ba') from None
        if not positive:
            raise ValueError(f'{key}={value!r} must be a positive duration, e.g. 500ba')
    if parameter in CHOICES and value not in CHOICES[parameter]:
        raise ValueError(f'{key}={value!r} must be one of {", ".join(CHOICES[parameter])}')


def build(kind: str, name: str, kwargs: dict[str, Any] | None) -> Any:
    """Instantiates a registered class with YAML keyword arguments (None means no arguments)."""
    kwargs = dict(kwargs or {})
    check_kwargs(kind, name, kwargs)
    return lookup(kind, name)(**kwargs)


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer named by `cfg['name']`; weight decay skips biases, norms and the embedding table.

    Decaying the raw embedding table would only shrink rows that are normalised anyway, which
    raises their effective learning rate without regularising anything.
    """
    kwargs = {k: v for k, v in cfg.items() if k != 'name'}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim < 2 or id(param) in tables else decay).append(param)
    groups = [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return lookup('optimizer', cfg['name'])(groups, **kwargs)


def enabled(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The entries of an `algorithms`/`callbacks`/`loggers` section that are on, with their kwargs.

    `name: {...}` passes keyword arguments, `name: {}`, `name: null` or `name: true` uses the
    defaults, and `name: false` switches off an entry (e.g. `callbacks.time_warp_refit=false`).
    """
    return {
        name: dict(kwargs) if isinstance(kwargs, dict) else {}
        for name, kwargs in section.items()
        if kwargs is not False
    }


def check_sections(cfg: Any) -> None:
    """Checks every registry-backed section of a `TrainConfig` before anything is built."""
    if 'name' not in cfg.optimizer:
        raise ValueError(f'optimizer needs a name; valid names: {", ".join(sorted(OPTIMIZERS))}')
    if 'name' not in cfg.scheduler:
        raise ValueError(f'scheduler needs a name; valid names: {", ".join(sorted(SCHEDULERS))}')
    opt = {k: v for k, v in cfg.optimizer.items() if k != 'name'}
    check_kwargs('optimizer', cfg.optimizer['name'], opt, skip=('params',))
    sched = {k: v for k, v in cfg.scheduler.items() if k != 'name'}
    check_kwargs('scheduler', cfg.scheduler['name'], sched)
    for kind in ('algorithms', 'callbacks', 'loggers'):
        for name, value in getattr(cfg, kind).items():
            if not (value is None or isinstance(value, (bool, dict))):
                raise ValueError(
                    f'{kind}.{name}={value!r} must be a mapping of keyword arguments, true, false or null'
                )
        for name, kwargs in enabled(getattr(cfg, kind)).items():
            check_kwargs(kind, name, kwargs)
