"""Every workaround of a dependency's defect, in one place, each with its upstream issue.

A workaround is written against one version of its package (the one `setup.py` pins), but GPU
images ship their own torch (torch 2.11 beside Composer 0.32.1 and Streaming 0.13.0 installed
without their deps is supported). So a patch checks what it patches, not the version: the
attribute it replaces, the signature of the function it wraps, or a small self-test of the
defect. Where that check passes the patch applies, whatever the version; where it fails the
patch stays off with a one-line warning naming it (`Unpatchable`), and the run goes on: a
workaround never ends a run. `require` notes a subclass workaround built on a version it was
not written for, once, and lets it build.

The patches replace module attributes of torch, Composer or Streaming; each keeps the
original under `__wrapped__` and is idempotent. `apply_all` applies them all; `train.py`
calls it once per process, before anything is built. The two gloo patches apply only to a run
on the CPU, where gloo is the process group's backend.

Patches here (package: defect):
- `gloo_gradient_reductions` (torch): gloo's reduce-scatter sums when asked to average.
- `cpu_stream_events` (torch): `torch.cpu.Stream.record_event` returns None; HSDP asserts an event.
- `weights_only_sharded_loads` (torch): DCP unpickles `.metadata` with plain `pickle.load`.
- `weights_only_composer_loads` (mosaicml): checkpoints are read with `torch.load(weights_only=False)`.
- `streaming_releases_probed_blocks` (mosaicml-streaming): each probed block holds a descriptor.
- `streaming_node_namespace` (mosaicml-streaming): two nodes on one host pick the same names.
- `engine_debug_log` (mosaicml): the engine formats a debug line per event and per callback nobody reads.
- `autoresume_downloads_the_newest` (mosaicml): a second resume from a bucket loads the first one's copy.
- `checkpoint_pointer_follows_its_upload` (mosaicml): the `latest` pointer lags its checkpoint by up to 30 s.

Subclasses elsewhere, guarded the same way when built:
- `loggers.AppendingFileLogger` (mosaicml): `FileLogger(overwrite=False)` still truncates.
- `loggers.ResumableProgressBar` (mosaicml): the bar's state cannot load from a sharded checkpoint.
- `sharding.HybridShardConfig` (mosaicml): `FSDP2Config` fixes a 1-D mesh, so no HSDP.
- `algorithms.ema.EMA` (mosaicml): Composer's EMA copies parameters before FSDP2 makes DTensors.
- `data.loaders.clean_shared_memory` (mosaicml-streaming): Streaming's cleaner unlinks every job's.

`WORKAROUNDS` holds each one's upstream issue; "none found" means that a search of the tracker
turned up none, and the defect is described where the workaround lives, against the pinned source.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import io
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

PINNED = {'torch': '2.7.0', 'mosaicml': '0.32.1', 'mosaicml-streaming': '0.13.0'}  # as in setup.py


@dataclass(frozen=True)
class Workaround:
    """One workaround: the package it works around and where its defect is reported."""

    package: str
    upstream: str


WORKAROUNDS = {
    'gloo_gradient_reductions': Workaround('torch', 'https://github.com/pytorch/pytorch/issues/162338'),
    'cpu_stream_events': Workaround('torch', 'https://github.com/pytorch/pytorch/pull/150316'),
    'weights_only_sharded_loads': Workaround('torch', 'https://github.com/pytorch/pytorch/issues/189308'),
    'weights_only_composer_loads': Workaround('mosaicml', 'none found'),
    'streaming_releases_probed_blocks': Workaround(
        'mosaicml-streaming', 'https://github.com/mosaicml/streaming/issues/457'
    ),
    'streaming_node_namespace': Workaround('mosaicml-streaming', 'none found'),
    'engine_debug_log': Workaround('mosaicml', 'none found'),
    'autoresume_downloads_the_newest': Workaround('mosaicml', 'none found'),
    'checkpoint_pointer_follows_its_upload': Workaround('mosaicml', 'none found'),
    'AppendingFileLogger': Workaround('mosaicml', 'none found'),
    'ResumableProgressBar': Workaround('mosaicml', 'none found'),
    'HybridShardConfig': Workaround('mosaicml', 'none found'),
    'EMA': Workaround('mosaicml', 'none found'),
    'clean_shared_memory': Workaround('mosaicml-streaming', 'none found'),
}


def installed_version(package: str) -> str:
    """The installed version of `package`, without a local suffix ('2.7.0+cu126' -> '2.7.0')."""
    return importlib.metadata.version(package).split('+')[0]


class Unpatchable(RuntimeError):
    """What a patch replaces is not what it was written against: the patch stays off."""


_NOTED: set[str] = set()


def require(name: str) -> None:
    """Notes, once, a subclass workaround built on another version than it was written for; never raises.

    The subclasses here override behaviour, not private code paths, so they build on any version;
    the warning names what to check (the upstream issue may be fixed there).
    """
    workaround = WORKAROUNDS[name]
    pinned, found = PINNED[workaround.package], installed_version(workaround.package)
    if found != pinned and name not in _NOTED:
        _NOTED.add(name)
        log.warning(
            'cdcd_composer.workarounds: %s was written for %s %s, found %s; it still applies (upstream: %s)',
            name, workaround.package, pinned, found, workaround.upstream,
        )  # fmt: skip


def missing(name: str, where: str, attribute: str) -> Unpatchable:
    """The error of a patch whose target is not the one it was written against."""
    return Unpatchable(
        f'cdcd_composer.workarounds: {name} stays off: {where} has no {attribute} as '
        f'{WORKAROUNDS[name].package} {PINNED[WORKAROUNDS[name].package]} has (found '
        f'{installed_version(WORKAROUNDS[name].package)}); upstream: {WORKAROUNDS[name].upstream}'
    )


def apply_all(trust_checkpoint: bool, on_cpu: bool = True) -> list[str]:
    """Applies every patch whose target checks pass, warning in one line for each that stays off.

    `trust_checkpoint` lets checkpoint loads unpickle types outside the allowlist; `on_cpu` (a run
    on the CPU, whose collectives are gloo's) adds the two gloo patches.

    Returns:
        The names of the patches that stayed off, each already warned about in one line.
    """
    patches = [
        functools.partial(weights_only_composer_loads, trust_checkpoint),
        functools.partial(weights_only_sharded_loads, trust_checkpoint),
        streaming_releases_probed_blocks,
        streaming_node_namespace,
        engine_debug_log,
        autoresume_downloads_the_newest,
        checkpoint_pointer_follows_its_upload,
    ]
    if on_cpu:
        patches = [gloo_gradient_reductions, cpu_stream_events, *patches]
    off = []
    for patch in patches:
        try:
            patch()
        except Unpatchable as error:
            log.warning('%s', error)
            off.append(getattr(patch, 'func', patch).__name__)
    return off


def gloo_gradient_reductions() -> None:
    """Makes FSDP2 average gradients correctly over gloo (CPU) process groups; NCCL is untouched.

    FSDP2 reduces fp32 and bf16 gradients with `ReduceOp.AVG`. Gloo's `reduce_scatter_tensor`
    silently sums instead (every gradient comes out world-size times too large, which Adam
    mostly hides but gradient clipping does not), and gloo's `all_reduce` rejects AVG, so HSDP's
    cross-replica reduction fails. On gloo groups FSDP2 is sent down the path it has for fp16
    reductions: SUM collectives, then one division by the data-parallel size.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    original = getattr(_fsdp_collectives, '_get_gradient_divide_factors', None)
    if original is None:
        raise missing('gloo_gradient_reductions', '_fsdp_collectives', '_get_gradient_divide_factors')
    original = getattr(original, '__wrapped__', original)
    parameters = list(inspect.signature(original).parameters)
    if parameters == ['reduce_scatter_group', 'all_reduce_group', 'reduce_dtype', 'device_type']:
        divide_factors = _gloo_divide_factors_2_7(original)  # torch 2.7: (pre, post) factors
    elif 'force_sum_reduction_for_comms' in parameters:
        divide_factors = _gloo_divide_factors_forced_sum(original)  # torch >= 2.9: its own switch
    else:
        raise missing('gloo_gradient_reductions', '_get_gradient_divide_factors', 'a known signature')
    _fsdp_collectives._get_gradient_divide_factors = divide_factors


def _is_gloo(group: Any) -> bool:
    """Whether a (possibly None) process group runs on gloo."""
    return group is not None and torch.distributed.get_backend(group) == 'gloo'


def _gloo_divide_factors_2_7(original: Any) -> Any:
    """The `_get_gradient_divide_factors` of torch 2.7, sending gloo groups down its fp16 path."""

    @functools.wraps(original)
    def divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=''):
        if not _is_gloo(reduce_scatter_group):
            return original(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)
        replicas = all_reduce_group.size() if all_reduce_group is not None else 1
        # A pre-divide factor of 1 selects ReduceOp.SUM for both collectives and divides nothing first.
        return 1.0, float(reduce_scatter_group.size() * replicas)

    return divide_factors


def _gloo_divide_factors_forced_sum(original: Any) -> Any:
    """The `_get_gradient_divide_factors` of newer torch, with `force_sum_reduction_for_comms` on gloo."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def divide_factors(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if _is_gloo(bound.arguments.get('reduce_scatter_group')):
            bound.arguments['force_sum_reduction_for_comms'] = True  # SUM collectives, then one division
        return original(*bound.args, **bound.kwargs)

    return divide_factors


def cpu_stream_events() -> None:
    """Gives `torch.cpu.Stream.record_event` an event to return, as HSDP's cross-replica all-reduce asserts.

    CPU collectives here complete before they return, so an always-complete `torch.cpu.Event`
    is the truth.
    """
    if torch.cpu.Stream().record_event() is None:
        torch.cpu.Stream.record_event = lambda self: torch.cpu.Event()


def weights_only_composer_loads(trust: bool) -> None:
    """Makes every checkpoint Composer reads (autoresume, `load_path`) weights-only, unless `trust`.

    Composer 0.32.1 reads every checkpoint file with `_torch_load_with_validation`, which calls
    `torch.load(weights_only=False)` (composer/utils/checkpoint.py; composer/checkpoint/load.py
    imports it by name). Both references are replaced by the load of `checkpoints.trust`.
    """
    import composer.checkpoint.load as new_loader
    import composer.utils.checkpoint as loader

    for module in (loader, new_loader):
        original = getattr(module, '_torch_load_with_validation', None)
        if original is None:
            raise missing('weights_only_composer_loads', module.__name__, '_torch_load_with_validation')
        module._torch_load_with_validation = _weights_only(getattr(original, '__wrapped__', original), trust)


def _weights_only(original: Any, trust: bool) -> Any:
    """Composer's checkpoint loader with its `torch.load` made weights-only unless `trust`."""
    from composer.utils.checkpoint import _ensure_valid_checkpoint

    from cdcd_composer.checkpoints.trust import weights_only_load

    @functools.wraps(original)
    def load(checkpoint_filepath: Any, map_location: str) -> Any:
        validated = str(_ensure_valid_checkpoint(checkpoint_filepath))  # Composer's own validation hook
        # A damaged file raises what torch.load raises: train.py names the way out (checkpoints.resume).
        return weights_only_load(validated, str(checkpoint_filepath), trust, flag='trust_checkpoint=true')

    return load


class _RestrictedPickle:
    """The `pickle` module as DCP's filesystem reader sees it: `load` is `DCPMetadataUnpickler`'s."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file: Any) -> Any:
        from cdcd_composer.checkpoints.trust import DCPMetadataUnpickler

        unpickler = DCPMetadataUnpickler(file)
        unpickler.path = getattr(file, 'name', '.metadata')
        return unpickler.load()


def weights_only_sharded_loads(trust: bool) -> None:
    """Makes torch.distributed.checkpoint read a sharded checkpoint without running code, unless `trust`.

    torch 2.7 unpickles a sharded checkpoint's `.metadata` with plain `pickle.load`
    (`FileSystemReader.read_metadata`) and its non-tensor entries with `torch.load(weights_only=False)`
    (`DefaultLoadPlanner.load_bytes`); Composer's sharded resume and `dcp_to_torch_save` use both.
    The first gets `checkpoints.trust.DCPMetadataUnpickler`, the second the weights-only load.
    """
    from torch.distributed.checkpoint import default_planner, filesystem

    from cdcd_composer.checkpoints.trust import weights_only_load

    if not isinstance(getattr(filesystem, 'pickle', None), (type(pickle), _RestrictedPickle)):
        raise missing('weights_only_sharded_loads', 'torch.distributed.checkpoint.filesystem', 'pickle')
    if not hasattr(default_planner.DefaultLoadPlanner, 'load_bytes'):
        raise missing('weights_only_sharded_loads', 'DefaultLoadPlanner', 'load_bytes')
    planner = default_planner.DefaultLoadPlanner
    original = getattr(planner.load_bytes, '__wrapped__', planner.load_bytes)
    if trust:
        filesystem.pickle, planner.load_bytes = pickle, original
        return
    filesystem.pickle = _RestrictedPickle()

    @functools.wraps(original)
    def load_bytes(self: Any, read_item: Any, value: Any) -> None:
        entry = f'the sharded checkpoint entry {read_item.dest_index.fqn}'
        loaded = weights_only_load(value, entry, trust=False, flag='trust_checkpoint=true')
        value = io.BytesIO()
        torch.save(loaded, value)  # the original stores what it loads: hand it the accepted bytes
        value.seek(0)
        original(self, read_item, value)

    planner.load_bytes = load_bytes


def streaming_releases_probed_blocks() -> None:
    """Lets Streaming's search for a free shared-memory prefix close the blocks it only looks at.

    Streaming 0.13's `prefix._check_and_find` attaches to every registered prefix's block to read
    it, through a `SharedMemory` that registers its cleanup with `atexit`, so each attach holds a
    file descriptor until the process ends: about 500 per dataset on a machine with a few hundred
    stale prefixes, which runs a long process (a test session, a notebook) out of descriptors.
    Blocks attached (create=False) here skip the `atexit` hook, so the builtin `SharedMemory`
    closes them once dropped; blocks created keep it.
    """
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as streaming_prefix

    original = getattr(streaming_prefix, 'SharedMemory', None)
    if original is None:
        raise missing('streaming_releases_probed_blocks', 'streaming.base.shared.prefix', 'SharedMemory')
    original = getattr(original, '__wrapped__', original)

    def attach_or_create(name: str | None = None, create: bool | None = None, size: int = 0,
                         auto_cleanup: bool = True) -> SharedMemory:  # fmt: skip
        return original(name, create, size, auto_cleanup=auto_cleanup and create is not False)

    attach_or_create.__wrapped__ = original  # type: ignore[attr-defined]
    streaming_prefix.SharedMemory = attach_or_create  # type: ignore[attr-defined]


SHM_NAMESPACE_ENV = 'CDCD_SHM_NAMESPACE'


def streaming_node_namespace() -> str:
    """Gives this node's Streaming shared memory and file locks names of their own, `node{NODE_RANK}_...`.

    Streaming names them `{prefix:06}_{name}` and every node's local leader picks the same first
    free prefix, which assumes one node per host: two nodes on one machine (a simulated cluster,
    or two jobs' nodes packed on one host) create the same names and crash. With the node rank in
    every name (or `$CDCD_SHM_NAMESPACE` when set), each node has its own set; the ranks of one
    node still share theirs. Forked DataLoader workers inherit it.

    Returns:
        The namespace.
    """
    import streaming.base.dataset
    import streaming.base.util
    from streaming.base.shared import prefix as streaming_prefix

    namespace = os.environ.get(SHM_NAMESPACE_ENV) or f'node{os.environ.get("NODE_RANK", "0")}'
    original = getattr(streaming_prefix._get_path, '__wrapped__', streaming_prefix._get_path)

    def namespaced(prefix_int: int, name: str) -> str:
        return f'{namespace}_{original(prefix_int, name)}'

    namespaced.__wrapped__ = original  # type: ignore[attr-defined]
    for module in (streaming_prefix, streaming.base.dataset, streaming.base.util):
        if not hasattr(module, '_get_path'):
            raise missing('streaming_node_namespace', module.__name__, '_get_path')
        module._get_path = namespaced  # type: ignore[attr-defined]
    return namespace


def engine_debug_log() -> None:
    """Formats Composer's per-event engine debug lines only when `$ENGINE_DEBUG` asks for them.

    Composer 0.32's `Engine._debug_log` builds its `[ep=..][ba=..][event=..]` prefix (timestamp
    reads and enum lookups) for every event, every algorithm and every callback it runs, and only
    then checks `$ENGINE_DEBUG`, unset in any normal run: about 380 prefixes per batch of 8
    microbatches in the shipped YAMLs, 3% of a launch-bound batch (`bench/train.py --overhead`).
    With `$ENGINE_DEBUG` set the original runs, and logs as before.
    """
    from composer.core.engine import Engine

    if not hasattr(Engine, '_debug_log'):
        raise missing('engine_debug_log', 'composer.core.engine.Engine', '_debug_log')
    original = getattr(Engine._debug_log, '__wrapped__', Engine._debug_log)

    def debug_log(self: Engine, event: Any, msg: str) -> None:
        if os.environ.get('ENGINE_DEBUG'):
            original(self, event, msg)

    debug_log.__wrapped__ = original  # type: ignore[attr-defined]
    Engine._debug_log = debug_log  # type: ignore[method-assign]


def autoresume_downloads_the_newest() -> None:
    """Makes every autoresume from an object store download the checkpoint it resumes from.

    With `save_folder` an object-store URI, Composer 0.32's `Trainer._get_autoresume_checkpoint`
    downloads the checkpoint that `latest-rank0.pt.symlink` names to
    `os.path.join(save_folder, 'latest-rank0.pt')` taken as a local path (`./s3:/bucket/...`
    under the working directory), and downloads only when that file is absent. A second resume
    of the same run from the same directory therefore finds the first resume's copy and loads
    it: an older checkpoint, silently, and the batches since are trained again. Local rank 0
    (the rank that downloads) removes that copy before Composer looks for it, so each resume
    reads the newest checkpoint; a local `save_folder` is left to Composer as it is.
    """
    from composer.trainer.trainer import Trainer
    from composer.utils import dist, format_name_with_dist, parse_uri

    original = getattr(Trainer, '_get_autoresume_checkpoint', None)
    original = getattr(original, '__wrapped__', original)
    if original is None or list(inspect.signature(original).parameters)[:3] != [
        'self',
        'save_folder',
        'save_latest_filename',
    ]:
        raise missing(
            'autoresume_downloads_the_newest', 'Trainer', '_get_autoresume_checkpoint(save_folder, ...)'
        )

    def get_autoresume_checkpoint(
        self: Trainer, save_folder: str, save_latest_filename: str, *args, **kwargs
    ):
        if parse_uri(save_folder)[0] and dist.get_local_rank() == 0:
            run_name = self.state.run_name
            folder = format_name_with_dist(save_folder, run_name)
            copy = os.path.abspath(
                os.path.join(folder, format_name_with_dist(save_latest_filename, run_name))
            )
            if os.path.isfile(copy):
                os.remove(copy)
        return original(self, save_folder, save_latest_filename, *args, **kwargs)

    get_autoresume_checkpoint.__wrapped__ = original  # type: ignore[attr-defined]
    Trainer._get_autoresume_checkpoint = get_autoresume_checkpoint  # type: ignore[method-assign]


POINTER_POLL_SECONDS = 1.0


def checkpoint_pointer_follows_its_upload() -> None:
    """Uploads an object-store run's `latest` pointer about a second after its checkpoint is up.

    Composer 0.32's `CheckpointSaver` uploads `latest-rank0.pt.symlink` once a background worker
    has seen every file of the new checkpoint in the bucket, and that worker looks again only
    every 30 s (`_symlink_upload_wait_before_next_try_in_seconds`, fixed in `__init__`). So the
    pointer lags its checkpoint by up to 30 s, a run killed in that window resumes from the
    checkpoint before, and every run's end waits up to 30 s per pending pointer. Looking every
    `POINTER_POLL_SECONDS` costs one HEAD request per second while an upload is in flight.
    """
    from composer.callbacks import CheckpointSaver

    original = getattr(CheckpointSaver.__init__, '__wrapped__', CheckpointSaver.__init__)
    probe = object.__new__(CheckpointSaver)
    try:  # the attribute is set in __init__: build one to see it (no I/O happens there)
        original(probe, folder='{run_name}/checkpoints')
    except Exception as error:  # noqa: BLE001 - any failure means the target is not the known one
        raise missing(
            'checkpoint_pointer_follows_its_upload', 'CheckpointSaver', '__init__(folder=...)'
        ) from error
    if not hasattr(probe, '_symlink_upload_wait_before_next_try_in_seconds'):
        raise missing(
            'checkpoint_pointer_follows_its_upload', 'CheckpointSaver',
            '_symlink_upload_wait_before_next_try_in_seconds',
        )  # fmt: skip

    @functools.wraps(original)
    def init(self: CheckpointSaver, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self._symlink_upload_wait_before_next_try_in_seconds = POINTER_POLL_SECONDS

    CheckpointSaver.__init__ = init  # functools.wraps keeps the original as __wrapped__  # type: ignore[method-assign]
