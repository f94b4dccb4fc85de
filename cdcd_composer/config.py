"""Run configuration: YAML plus dotted overrides, checked by name and type before any work starts."""

from __future__ import annotations

import dataclasses
import math
import os
import string
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from composer.core import Time
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from cdcd_composer.diffusion import EVAL_NOISE_LEVELS
from cdcd_composer.masking import MaskingConfig
from cdcd_composer.model import CDCDConfig


@dataclass
class DataConfig:
    """Where the MDS dataset lives and how it is read."""

    root: str  # Local directory or object-store URI holding train/, val/, tokenizer/.
    local_cache: str | None = None  # Local cache for a remote root.
    seq_len: int | None = None  # Expected canvas length; checked against the dataset when set.
    num_workers: int = 0
    train_split: str = 'train'
    eval_split: str = 'val'
    # Streaming's sample order depends on these and the seed, not on the number of ranks: keep
    # them fixed across a change of GPUs and a resumed run reads what an uninterrupted one would.
    # null: Streaming's default (64 x the physical nodes: it then changes with the node count).
    num_canonical_nodes: int | None = None
    shuffle_algo: str = 'py1e'


@dataclass
class DiffusionConfig:
    """The forward process (§2.1)."""

    t_min: float = 1.0
    t_max: float = 300.0
    eval_noise_levels: list[float] = field(default_factory=lambda: list(EVAL_NOISE_LEVELS))


@dataclass
class LossConfig:
    """Terms of the training loss besides the cross-entropy (score interpolation, §3.1)."""

    mse_weight: float = 0.0  # Weight of ||x0_hat - e||^2 / d_embed (Difformer); 0: CE only (paper).


@dataclass
class ModelConfig(CDCDConfig):
    """`CDCDConfig` whose vocab_size may be null: then it is read from the dataset."""

    vocab_size: int | None = None  # type: ignore[assignment]


@dataclass
class TrainConfig:
    """Everything `train.py` accepts; free-form values belong under `variables`."""

    model: ModelConfig
    data: DataConfig
    max_duration: str  # Composer time string: '4800ba', '2ep', '10000000tok'.
    global_train_batch_size: int
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masking: MaskingConfig | None = None  # Conditioning masks in training; None: all generated.
    variables: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None
    seed: int = 17
    device_train_microbatch_size: int | str | None = None  # None: the whole per-device batch.
    device_eval_batch_size: int = 32
    eval_interval: str = '500ba'
    eval_subset_num_batches: int = -1
    optimizer: dict[str, Any] = field(default_factory=lambda: {'name': 'decoupled_adamw', 'lr': 1.0e-4})
    scheduler: dict[str, Any] = field(
        default_factory=lambda: {'name': 'cosine_with_warmup', 't_warmup': '100ba', 'alpha_f': 0.1}
    )
    # name -> keyword arguments ({} or null for defaults; false disables an entry of the YAML);
    # the entries are checked against the registry (`registry.check_sections`).
    algorithms: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None  # None: amp_bf16 on GPU, fp32 on CPU.
    device: str | None = None  # None: Composer picks GPU when present.
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = '50ba'
    save_folder: str | None = None
    save_interval: str = '1000ba'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    upload_attempts: int = 10  # boto3 attempts per transfer, exponential backoff (~1 min of outage).
    load_path: str | None = None
    # Composer checkpoints are pickles, read weights-only (cdcd_composer.checkpoints.trust): true
    # allows a full unpickle of one holding types outside the allowlist, for a file you wrote and trust.
    trust_checkpoint: bool = False
    load_weights_only: bool = False
    parallelism_config: dict[str, Any] | None = None
    compile_config: dict[str, Any] | None = None
    dist_timeout: float = 300.0

    def __post_init__(self) -> None:
        for key in ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval'):
            value = getattr(self, key)
            try:
                Time.from_timestring(value)
            except ValueError:
                raise ValueError(
                    f'{key}={value!r} is not a Composer time string; write e.g. 500ba, 2ep or 1000000tok'
                ) from None
        check_compile_config(self.compile_config)
        if self.autoresume and not self.run_name:
            raise ValueError('autoresume=true needs a fixed run_name (set run_name: my-run)')
        if self.autoresume and not self.save_folder:
            # save_folder=null keeps no checkpoints, so there is nothing to resume from: a YAML's
            # `autoresume: true` stays out of the way of a one-off run.
            self.autoresume = False


COMPILE_KEYS = ('fullgraph', 'dynamic', 'backend', 'mode', 'options', 'disable')  # torch.compile's
COMPILE_MODES = (None, 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def check_compile_config(options: dict[str, Any] | None) -> None:
    """`compile_config` holds torch.compile keyword arguments that torch.compile accepts.

    Raises:
        ValueError: one line naming the key or value, before anything is built.
    """
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f'compile_config={options!r} must be a mapping of torch.compile options, e.g. {{}}')
    unknown = sorted(set(options) - set(COMPILE_KEYS))
    if unknown:
        raise ValueError(
            f'compile_config.{unknown[0]} is not a torch.compile option ({", ".join(COMPILE_KEYS)})'
        )
    if options.get('mode') not in COMPILE_MODES:
        modes = ', '.join(str(m) for m in COMPILE_MODES[1:])
        raise ValueError(f'compile_config.mode={options["mode"]!r} is not one of {modes}')
    backend = options.get('backend')
    if isinstance(backend, str):
        import torch._dynamo

        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f'compile_config.backend={backend!r} is not a torch.compile backend (inductor, ...)'
            )


def _positive(v: Any) -> bool:
    return 0 < v < math.inf  # NaN fails every comparison, so it is refused too


def _non_negative(v: Any) -> bool:
    return 0 <= v < math.inf


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


SHUFFLE_ALGOS = ('py1e', 'py1b', 'py1br', 'py1s', 'py2s', 'naive')  # Streaming 0.13's shuffles
DEVICES = ('cpu', 'gpu', 'mps')  # what Composer's get_device accepts here (null: GPU when present)
# Ranges the types alone do not say: (key, check, what it must be); checked before any work.
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ('seed', lambda v: 0 <= v < 2**32, 'an integer in [0, 2^32 - 1]'),
    ('global_train_batch_size', _positive, 'a positive integer'),
    ('device_train_microbatch_size', lambda v: not isinstance(v, int) or v > 0,  # strings: validate()
     "a positive integer, 'auto' or null (the whole per-device batch)"),
    ('device_eval_batch_size', _positive, 'a positive integer'),
    ('eval_subset_num_batches', lambda v: v == -1 or v > 0, 'a positive integer, or -1 for the whole split'),
    ('save_num_checkpoints_to_keep', lambda v: v == -1 or v >= 0, 'an integer >= 0, or -1 to keep all'),
    ('dist_timeout', _positive, 'a positive number of seconds'),
    ('upload_attempts', _positive, 'a positive integer'),
    ('data.num_workers', _non_negative, 'an integer >= 0'),
    ('data.num_canonical_nodes', _optional(_positive), 'a positive integer or null'),
    ('data.shuffle_algo', lambda v: v in SHUFFLE_ALGOS, f'one of {", ".join(SHUFFLE_ALGOS)}'),
    ('diffusion.t_min', _positive, 'a positive finite number'),
    ('diffusion.t_max', _positive, 'a positive finite number above diffusion.t_min'),
    ('device', lambda v: v is None or v in DEVICES, f'null or one of {", ".join(DEVICES)}'),
)  # fmt: skip
OPTIMIZER_RANGES = (
    ('lr', _positive, 'a positive finite number'), ('eps', _positive, 'a positive finite number'),
    ('weight_decay', _non_negative, 'a finite number >= 0'),
)  # fmt: skip
POSITIVE_TIMES = ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval')


def check_ranges(cfg: TrainConfig) -> None:
    """Every value in its range (`RANGES`), before any work starts.

    Raises:
        ValueError: one line naming the key, its value and what it must be.
    """
    for key, check, what in RANGES:
        value = _attribute(cfg, key)
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f'{key}={value!r} must be {what}')
    if not cfg.diffusion.t_max > cfg.diffusion.t_min:
        raise ValueError(
            f'diffusion.t_max={cfg.diffusion.t_max} must be above diffusion.t_min={cfg.diffusion.t_min}'
        )
    for key in POSITIVE_TIMES:
        if Time.from_timestring(getattr(cfg, key)).value <= 0:
            raise ValueError(f'{key}={getattr(cfg, key)!r} must be a positive duration, e.g. 500ba')
    check_paths(cfg)
    # Numbers only: the registry names a value that is no finite number (`registry.check_value`).
    numbers = {k: v for k, v in cfg.optimizer.items() if _is_finite_number(v)}
    for name, check, what in OPTIMIZER_RANGES:
        if name in numbers and not check(numbers[name]):
            raise ValueError(f'optimizer.{name}={numbers[name]!r} must be {what}')
    betas = cfg.optimizer.get('betas')
    if (
        isinstance(betas, list)
        and all(map(_is_finite_number, betas))
        and not (len(betas) == 2 and all(0 <= b < 1 for b in betas))
    ):
        raise ValueError(f'optimizer.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.99]')


def placeholders(template: str) -> set[str]:
    """The `{name}` fields of a format string (a malformed one: ValueError)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


# Composer fills these in a logger's file name (format_name_with_dist); save_folder gets run_name.
FILE_LOGGER_FIELDS = {'run_name', 'rank', 'local_rank', 'node_rank', 'world_size', 'local_world_size'}


def check_paths(cfg: TrainConfig) -> None:
    """`save_folder` and the file log name only placeholders that are filled in; the log is a file.

    Raises:
        ValueError: one line naming the key, the placeholder and the fix.
    """
    file_logger = cfg.loggers.get('file')
    filename = file_logger.get('filename') if isinstance(file_logger, dict) else None
    for key, template, allowed in (('save_folder', cfg.save_folder, {'run_name'}),
                                   ('loggers.file.filename', filename, FILE_LOGGER_FIELDS)):  # fmt: skip
        if not isinstance(template, str):
            continue
        try:
            unknown = placeholders(template) - allowed
        except ValueError as e:
            raise ValueError(
                f'{key}={template!r} is no valid name pattern ({e}); write e.g. runs/{{run_name}}'
            ) from None
        if unknown:
            raise ValueError(
                f'{key}={template!r} uses {{{sorted(unknown)[0]}}}, which nothing fills in; use only '
                + ', '.join(f'{{{name}}}' for name in sorted(allowed))
            )
    if isinstance(filename, str):
        fields = dict.fromkeys(FILE_LOGGER_FIELDS, 0) | {'run_name': cfg.run_name or 'run'}
        if os.path.isdir(filename.format(**fields)):
            raise ValueError(
                f'loggers.file.filename={filename!r} is a directory; name a file in it, e.g. logs.txt'
            )


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _attribute(cfg: Any, dotted: str) -> Any:
    for part in dotted.split('.'):
        cfg = getattr(cfg, part)
    return cfg


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of the raw config (None where it is absent)."""
    value: Any = raw
    for part in dotted.split('.'):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _one_line(error: OmegaConfBaseException, raw: dict[str, Any]) -> ValueError:
    """OmegaConf's multi-line error as one line naming the key, the bad value and the fix."""
    key = error.full_key or ''
    name = key.rsplit('.', 1)[-1]
    parent = error.object_type if dataclasses.is_dataclass(error.object_type) else None
    if isinstance(error, ConfigKeyError) and parent is not None:
        valid = ', '.join(sorted(f.name for f in dataclasses.fields(parent)))
        hint = ' (free-form values go under `variables:`)' if '.' not in key else ''
        return ValueError(f'unknown key {key}{hint}; valid keys: {valid}')
    if isinstance(error, MissingMandatoryValue):
        return ValueError(f'missing required key {key}; add it to the YAML or as {key}=...')
    if isinstance(error, ValidationError) and parent is not None and name in typing.get_type_hints(parent):
        expected = _type_name(typing.get_type_hints(parent)[name])
        return ValueError(f'{key}={_lookup(raw, key)!r} has the wrong type: expected {expected}')
    return ValueError(f'{key or "the config"}: {str(error).splitlines()[0]}')


def load_config(yaml_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Reads a YAML file, applies `key.sub=value` overrides and resolves `${...}` references.

    Raises:
        ValueError: missing file, malformed YAML or override, or an unresolvable reference.
    """
    if os.path.isdir(yaml_path):
        raise ValueError(
            f'config file {yaml_path!r} is a directory; pass a YAML such as yamls/cdcd-tiny.yaml'
        )
    if not os.path.isfile(yaml_path):
        raise ValueError(f'config file {yaml_path!r} not found; pass a YAML such as yamls/cdcd-tiny.yaml')
    for item in overrides or []:
        if '=' not in item:
            raise ValueError(f'override {item!r} is not key=value (e.g. optimizer.lr=3e-4)')
    try:
        try:
            cfg = OmegaConf.load(yaml_path)
        except OSError as e:  # OmegaConf says "Invalid loaded object type" of a file holding a scalar
            if 'Invalid loaded object type' not in str(e):
                raise ValueError(f'cannot read config file {yaml_path}: {e.strerror or e}') from None
            cfg = None
        if not OmegaConf.is_dict(cfg):
            raise ValueError(
                f'{yaml_path} holds a {"list" if OmegaConf.is_list(cfg) else "single value"}; a config is a '
                'mapping of keys to values at the top level (model:, data:, ...)'
            )
        for item in overrides or []:
            cfg = _merge_override(cfg, item)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f'{yaml_path}: {str(e).splitlines()[0]}') from None
    except yaml.YAMLError as e:  # a syntax error in the file
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ValueError(f'{yaml_path} is not valid YAML{where}: {problem}') from None
    return resolved


def _merge_override(cfg: Any, item: str) -> Any:
    """`cfg` with one `key=value` override; a value of another shape than the YAML's names the key.

    Raises:
        ValueError: e.g. `loggers.file=[a,b]` where the YAML holds a mapping.
    """
    key = item.split('=', 1)[0]
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        if 'Cannot merge' not in str(e):
            raise
        current = OmegaConf.select(cfg, key)
        shape = (
            'a mapping'
            if OmegaConf.is_dict(current)
            else 'a list'
            if OmegaConf.is_list(current)
            else 'a value'
        )
        raise ValueError(
            f'override {item!r}: {key} is {shape} in the YAML; give {shape} of the same shape (e.g. '
            f'{key}.sub=value), or {key}=null to drop it'
        ) from None


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validates a resolved config dict into a `TrainConfig` (an OmegaConf structured config).

    Raises:
        ValueError: one line naming the key, the bad value and the fix.
    """
    if not isinstance(raw, dict):
        raise ValueError(f'the config must be a mapping of keys to values, got {raw!r}')
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))
    except OmegaConfBaseException as e:
        raise _one_line(e, raw) from None
    check_ranges(cfg)
    return cfg
