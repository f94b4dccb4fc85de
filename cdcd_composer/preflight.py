"""Preflight checks of a run config: what this machine, Composer and the object stores can do.

Each failure is one line naming the setting and the fix, raised before anything is built.
"""

from __future__ import annotations

import torch

from cdcd_composer.config import TrainConfig
from cdcd_composer.sharding import check_sharding, fsdp_version
from cdcd_composer.storage import Folder, is_remote


def trains_on_gpu(device: str | None) -> bool:
    """Whether a run with `device` trains on a GPU (null: if one is present, as Composer does)."""
    return device == 'gpu' or (device is None and torch.cuda.is_available())


def default_precision(device: str | None) -> str:
    """What `precision: null` means for a run on `device`: bf16 autocast on a GPU, fp32 elsewhere."""
    return 'amp_bf16' if trains_on_gpu(device) else 'fp32'


def check_system(cfg: TrainConfig) -> None:
    """Precision, device, FSDP and microbatch combinations this Composer cannot run, named before any work.

    Raises:
        ValueError: one line naming the setting and the fix.
    """
    on_gpu = trains_on_gpu(cfg.device)
    sharded = (cfg.parallelism_config or {}).get('fsdp') is not None
    if not on_gpu and cfg.precision not in (None, 'fp32'):
        raise ValueError(f'precision={cfg.precision} needs a GPU; on CPU set precision=fp32 (or null)')
    if sharded and fsdp_version() == '1' and not on_gpu:
        raise ValueError('FSDP_VERSION=1 (FSDP1) runs on GPUs only in Composer 0.32.1; unset it to use FSDP2')
    check_sharding(cfg.parallelism_config)
    microbatch = cfg.device_train_microbatch_size
    if isinstance(microbatch, str) and microbatch != 'auto':
        raise ValueError(f"device_train_microbatch_size={microbatch!r} must be an integer, 'auto' or null")
    if microbatch == 'auto' and not on_gpu:
        raise ValueError(
            'device_train_microbatch_size=auto searches GPU memory; on CPU set an integer or null'
        )
    if microbatch == 'auto' and sharded and fsdp_version() == '2':
        raise ValueError(
            'device_train_microbatch_size=auto works with DDP or FSDP1 only in Composer 0.32.1; under FSDP2 '
            'set an integer (e.g. device_train_microbatch_size=32), or run with FSDP_VERSION=1'
        )


def check_object_stores(cfg: TrainConfig) -> None:
    """The checkpoint bucket and a remote load_path are reachable, before anything is built.

    Raises:
        ValueError: one line naming the URI.
    """
    if cfg.save_folder is not None and is_remote(cfg.save_folder):
        folder = cfg.save_folder.format(run_name=cfg.run_name or 'run')
        Folder(folder.split('{')[0])  # Raises StorageError naming the URI when unreachable.
    if cfg.load_path is not None and is_remote(cfg.load_path):
        if not Folder(cfg.load_path.rsplit('/', 1)[0]).exists(cfg.load_path.rsplit('/', 1)[1]):
            raise ValueError(f'load_path {cfg.load_path} not found: check the URI')
