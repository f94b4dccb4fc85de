"""How the model's parameters are sharded: FSDP2 on a 1-D mesh, or hybrid sharding (HSDP) on a 2-D one.

HSDP shards every parameter inside a group of `data_parallel_shard_degree` ranks (one node's GPUs, so the
per-layer all-gathers and reduce-scatters stay on NVLink) and keeps `data_parallel_replicate_degree`
copies of that sharded model, one per group, whose gradients are all-reduced across nodes. Ranks
`[g * shard, (g + 1) * shard)` form group g, which is one node under the Composer launcher, torchrun
and Slurm, all of which number ranks node by node. Every rank still reads its own data.

The YAML keys are those of Composer's FSDP1 `FSDPConfig`, under `parallelism_config.fsdp`:

    data_parallel_shard_degree: 8         # GPUs per node (-1: whatever the replicas leave)
    data_parallel_replicate_degree: -1    # nodes (-1: world size / shard degree; null: no HSDP)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig
from torch.distributed.fsdp import FSDPModule

from cdcd_composer import workarounds

log = logging.getLogger(__name__)

HYBRID_KEYS = ('data_parallel_shard_degree', 'data_parallel_replicate_degree')


def fsdp_version() -> str:
    """The FSDP implementation Composer will use: '2' (set by `train.run`) unless FSDP_VERSION is '1'."""
    return os.environ.get('FSDP_VERSION', '2')


@dataclass
class HybridShardConfig(FSDP2Config):
    """`FSDP2Config` whose mesh may be 2-D (replicate x shard).

    Composer 0.32.1's `State` builds the FSDP device mesh from the config's two degrees, which
    `FSDP2Config` fixes to a 1-D mesh (shard -1, replicate None); here they are settable fields, as in
    `FSDPConfig`. With a replicate degree, `fully_shard` receives the 2-D mesh and does HSDP: each
    parameter is a DTensor placed `(Replicate(), Shard(0))`.
    """

    data_parallel_shard_degree: int = -1
    data_parallel_replicate_degree: int | None = None

    def __post_init__(self) -> None:
        workarounds.require('HybridShardConfig')
        super().__post_init__()


def trainer_parallelism(parallelism: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `parallelism_config` handed to Composer's Trainer.

    Under FSDP2 the `fsdp` section becomes a `HybridShardConfig` (1-D unless a replicate degree is set);
    FSDP1's `FSDPConfig` reads the degrees itself.
    """
    fsdp = (parallelism or {}).get('fsdp')
    if fsdp is None or fsdp_version() != '2':
        return parallelism
    return {**parallelism, 'fsdp': HybridShardConfig(**fsdp)}


def parallelism_for_world(
    parallelism: dict[str, Any] | None, world: int, resume_sharded: bool
) -> dict[str, Any] | None:
    """The YAML's `parallelism_config`, less FSDP on one device.

    On one process FSDP2 shards nothing, yet its hooks, copies and collectives per layer
    tripled the Composer path's cost per batch where a GPU is launch-bound (`bench/train.py
    --overhead`), so a one-device run trains the plain model. FSDP stays on one device when it
    is needed: to resume a sharded checkpoint (`resume_sharded`, which only FSDP can load), or
    for activation checkpointing or offload, which Composer applies through FSDP.

    Args:
        parallelism: The YAML's `parallelism_config`.
        world: The number of processes.
        resume_sharded: The run resumes from a sharded (DCP) checkpoint.
    """
    fsdp = (parallelism or {}).get('fsdp')
    if world > 1 or fsdp is None:
        return parallelism
    if resume_sharded or fsdp.get('activation_checkpointing') or fsdp.get('activation_cpu_offload'):
        log.info('one device: FSDP kept, %s', 'to resume a sharded checkpoint' if resume_sharded else
                 'for activation checkpointing or offload')  # fmt: skip
        return parallelism
    log.info('one device: training the plain model, without FSDP (checkpoints are single files)')
    rest = {key: value for key, value in parallelism.items() if key != 'fsdp'}
    return rest or None


class LoadSingleFileCheckpoint(Callback):
    """Lets an FSDP run with sharded checkpoints resume from a single-file one (a one-device run's).

    Composer chooses how to load from `state_dict_type`: 'sharded' reads a DCP folder only. For
    the load alone this callback switches it to 'full', under which every rank reads the whole
    file and keeps its own shards (`set_model_state_dict` and `set_optimizer_state_dict` with
    full state dicts); from then on the run saves sharded checkpoints again.
    """

    def before_load(self, state: State, logger: Logger) -> None:
        """Loads the next checkpoint as a full state dict."""
        state.fsdp_config.state_dict_type = 'full'

    def after_load(self, state: State, logger: Logger) -> None:
        """Saves sharded checkpoints again."""
        state.fsdp_config.state_dict_type = 'sharded'


def check_sharding(parallelism: dict[str, Any] | None) -> None:
    """The `fsdp` keys exist and the mesh degrees fit the world size, checked before anything is built.

    Raises:
        ValueError: one line naming the key or the degrees, and the fix.
    """
    fsdp = (parallelism or {}).get('fsdp')
    if fsdp is None:
        return
    if not isinstance(fsdp, dict):
        raise ValueError(f'parallelism_config.fsdp must be a mapping of FSDP settings, got {fsdp!r}')
    config = HybridShardConfig if fsdp_version() == '2' else FSDPConfig
    settable = {f.name for f in fields(config) if f.init and not f.name.startswith('_')}
    valid = sorted(settable - {'device_mesh'})  # a mesh is built from the degrees, never given
    for key in fsdp:
        if key not in valid:
            raise ValueError(f'unknown key parallelism_config.fsdp.{key}; valid keys: {", ".join(valid)}')
    shard = fsdp.get('data_parallel_shard_degree', -1)
    replicate = fsdp.get('data_parallel_replicate_degree')
    for key, degree in zip(HYBRID_KEYS, (shard, replicate)):
        if degree is not None and (type(degree) is not int or degree < -1 or degree == 0):
            raise ValueError(f'parallelism_config.fsdp.{key}={degree!r} must be a positive integer or -1')
    degrees = [degree for degree in (shard, replicate) if degree is not None]
    if degrees.count(-1) > 1:
        raise ValueError(
            'parallelism_config.fsdp: data_parallel_shard_degree and data_parallel_replicate_degree cannot '
            'both be -1; set the shard degree to the GPUs per node'
        )
    fixed = math.prod(degree for degree in degrees if degree != -1)
    world = dist.get_world_size()
    if world % fixed if -1 in degrees else fixed != world:
        raise ValueError(
            f'parallelism_config.fsdp: replicate degree {replicate} x shard degree {shard} does not fit the '
            f'world size {world}; set data_parallel_shard_degree to the GPUs per node and '
            'data_parallel_replicate_degree to -1'
        )


class ReduceOnLastMicrobatch(Callback):
    """Under FSDP2, reduces gradients once per batch, after its last microbatch (as DDP's `no_sync`).

    Composer 0.32.1 runs every microbatch but the last of a DDP model inside `no_sync`, while an
    FSDP2 model reduce-scatters (and under HSDP also all-reduces) its gradients after every
    microbatch's backward: with 8 microbatches, 8 collectives per parameter group instead of 1.
    Before each training forward this tells FSDP2 whether that microbatch is the batch's last
    (`set_requires_gradient_sync`); the others accumulate unsharded gradients locally, which
    costs one unsharded gradient's memory per rank between the microbatches.

    With `reshard_after_forward: false` (parameters stay gathered from forward to backward) the
    parameters also stay gathered from one microbatch to the next (`set_reshard_after_backward`),
    so each unit all-gathers once per batch instead of once per microbatch, at the memory of one
    unsharded copy of the parameters during the batch; they are resharded after the last
    backward, before the optimizer step. On 2 CPU ranks in the launch-bound regime this cut
    cdcd-140m's batch from 0.75 s to 0.56 s (`python bench/train.py --overhead --set
    parallelism_config.fsdp.reshard_after_forward=false`).
    """

    def __init__(self) -> None:
        self.remaining = 0  # Microbatches of this batch still to run.

    def before_train_batch(self, state: State, logger: Logger) -> None:
        """Counts the batch's microbatches the way Composer splits it."""
        size = state.device_train_microbatch_size
        rows = len(next(iter(state.batch.values())))
        self.remaining = math.ceil(rows / size) if isinstance(size, int) and size > 0 else 1

    def before_forward(self, state: State, logger: Logger) -> None:
        """Only the last microbatch's backward reduces."""
        self.remaining -= 1
        last = self.remaining <= 0
        keep_unsharded = state.fsdp_config is not None and not state.fsdp_config.reshard_after_forward
        for module in state.model.modules():  # Composer shards the model's children, not the model.
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(last, recurse=False)
                if keep_unsharded:
                    module.set_reshard_after_backward(last, recurse=False)
