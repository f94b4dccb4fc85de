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

from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig

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
