"""Trains CDCD with Composer: `composer train.py yamls/cdcd-tiny.yaml key.sub=value ...`."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import sys
import tempfile
import zipfile
from typing import Any

import torch
from composer import DataSpec, Evaluator, Trainer
from composer.utils import dist, get_device, reproducibility

from cdcd_composer import registry
from cdcd_composer.callbacks import BatchNoiseSeed, RunMetadata
from cdcd_composer.checkpoint import refusal, untrusted_reason
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.config import TrainConfig, load_config, parse_config
from cdcd_composer.data import (
    DatasetMetadata,
    build_dataloader,
    check_split,
    check_tokenizer,
    clean_shared_memory,
    fetch_dataset_files,
)
from cdcd_composer.dataset_store import DatasetRoot, check_writable, is_remote
from cdcd_composer.tokenization import load_tokenizer, tokenizer_to_json

log = logging.getLogger('train')


def validate(cfg: TrainConfig) -> DatasetMetadata:
    """Every check that needs no model and no shards: registry names, keys, data paths, sizes.

    It also points an autoresumed run whose latest checkpoint lacks its pointer at that
    checkpoint (`resolve_autoresume` sets `cfg.load_path`).
    """
    registry.check_sections(cfg)
    check_split(cfg.data.root, cfg.data.train_split)
    check_split(cfg.data.root, cfg.data.eval_split)
    meta = DatasetMetadata.load(fetch_dataset_files(cfg.data.root, cfg.data.local_cache))
    check_object_stores(cfg)
    if cfg.save_folder is not None:
        check_writable(cfg.save_folder.format(run_name=cfg.run_name or 'run'), 'save_folder')
    check_load_path(cfg)
    resolve_autoresume(cfg)
    check_system(cfg)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != meta.vocab_size:
        raise ValueError(
            f'model.vocab_size={cfg.model.vocab_size} does not match the dataset vocabulary '
            f'({meta.vocab_size}); set model.vocab_size=null to take it from the data'
        )
    local = fetch_dataset_files(cfg.data.root, cfg.data.local_cache)
    check_tokenizer(meta, load_tokenizer(os.path.join(local, 'tokenizer')), 'tokenizer/', cfg.data.root)
    if cfg.data.seq_len is not None and cfg.data.seq_len != meta.seq_len:
        raise ValueError(
            f'data.seq_len={cfg.data.seq_len} but {cfg.data.root} holds {meta.seq_len}-token examples; '
            f'set data.seq_len={meta.seq_len} or convert the data again with --seq_len {cfg.data.seq_len}'
        )
    examples = meta.num_examples.get(cfg.data.train_split)
    if examples is not None and examples < cfg.global_train_batch_size:
        # With drop_last, no batch could ever be formed and the trainer would wait forever.
        raise ValueError(
            f'global_train_batch_size={cfg.global_train_batch_size} is larger than the '
            f'{examples} training examples in {cfg.data.root}; set global_train_batch_size<={examples}'
        )
    return meta


def fsdp_version() -> str:
    """The FSDP implementation Composer will use: '2' (our default, see `run`) unless FSDP_VERSION is '1'."""
    return os.environ.get('FSDP_VERSION', '2')


def check_system(cfg: TrainConfig) -> None:
    """Precision, device, FSDP and microbatch combinations this Composer cannot run, named before any work.

    Raises:
        ValueError: one line naming the setting and the fix.
    """
    on_gpu = cfg.device == 'gpu' or (cfg.device is None and torch.cuda.is_available())
    sharded = (cfg.parallelism_config or {}).get('fsdp') is not None
    if not on_gpu and cfg.precision not in (None, 'fp32'):
        raise ValueError(f'precision={cfg.precision} needs a GPU; on CPU set precision=fp32 (or null)')
    if sharded and fsdp_version() == '1' and not on_gpu:
        raise ValueError('FSDP_VERSION=1 (FSDP1) runs on GPUs only in Composer 0.32.1; unset it to use FSDP2')
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


CHECKPOINT_NAME = re.compile(r'ep(\d+)-ba(\d+)-rank0\.pt$|ep(\d+)-ba(\d+)$')


def checkpoints_in(folder: str) -> list[str]:
    """Checkpoint names in a save folder (local or remote), oldest first by batch."""
    names = [n for n in DatasetRoot(folder).list_names() if CHECKPOINT_NAME.match(n)]
    return sorted(names, key=lambda n: int(re.search(r'ba(\d+)', n).group(1)))


def checkpoint_is_complete(folder: str, name: str) -> bool:
    """Whether a checkpoint in `folder` is whole, without unpickling it.

    A `.pt` is a zip archive (torch.save): every member's CRC must check out. A sharded checkpoint
    is a folder that is complete once its `.metadata` exists (written after the shards).
    """
    root = DatasetRoot(folder)
    if not name.endswith('.pt'):
        return root.exists(f'{name}/.metadata')
    with tempfile.TemporaryDirectory() as tmp:
        local = (
            root.fetch_file(name, os.path.join(tmp, name))
            if is_remote(folder)
            else os.path.join(folder, name)
        )
        try:
            with zipfile.ZipFile(local) as archive:
                return archive.testzip() is None
        except (zipfile.BadZipFile, OSError, EOFError):
            return False


def resolve_autoresume(cfg: TrainConfig) -> None:
    """Makes autoresume find checkpoints that lack their `latest-rank0.pt` pointer.

    Composer resumes from that pointer only; a run killed between uploading a checkpoint and
    its pointer would start again from scratch. Then the newest complete checkpoint (older ones
    when the newest is damaged) becomes `load_path`, which Composer uses when no pointer exists.

    Raises:
        ValueError: checkpoints exist but none is complete.
    """
    if not cfg.autoresume or cfg.save_folder is None:
        return
    folder = cfg.save_folder.format(run_name=cfg.run_name)
    names = DatasetRoot(folder).list_names()
    found = checkpoints_in(folder)
    if not found or any(n.startswith('latest-rank0.pt') for n in names):
        return
    for name in reversed(found):
        if checkpoint_is_complete(folder, name):
            log.warning('%s has no latest-rank0.pt pointer; resuming from %s, its newest complete checkpoint',
                        folder, name)  # fmt: skip
            cfg.load_path = f'{folder}/{name}'
            return
        log.warning('skipping %s/%s: the checkpoint is incomplete or damaged', folder, name)
    raise ValueError(
        f'{folder} holds checkpoints ({", ".join(found)}) but none is complete: move them away to start '
        'afresh'
    )


def trust_flag(folder: str) -> str:
    """' trust_checkpoint=true' for an object-store folder (its pickles need it as a load_path)."""
    return ' trust_checkpoint=true' if is_remote(folder) else ''


def unloadable_checkpoint(cfg: TrainConfig, error: Exception) -> ValueError:
    """The one-line error for a checkpoint that cannot be loaded, naming the way out."""
    folder = cfg.save_folder.format(run_name=cfg.run_name) if cfg.save_folder else None
    older = checkpoints_in(folder)[:-1] if folder else []
    way_out = (
        f'set load_path={folder}/{older[-1]}{trust_flag(folder)} to resume from the one before'
        if older
        else 'start afresh'
    )
    return ValueError(
        f'cannot load the checkpoint to resume from ({type(error).__name__}: '
        f'{str(error).splitlines()[0][:120] if str(error) else ""}); it is damaged: delete it and its '
        f'latest-rank0.pt pointer, or {way_out}'
    )


def looks_like_a_checkpoint(path: str) -> bool:
    """A torch.save file: a zip archive (the default format) or a bare pickle (protocol >= 2)."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head.startswith(b'PK\x03\x04') or head[:1] == b'\x80'


def check_load_path(cfg: TrainConfig) -> None:
    """A load_path exists and, being a pickle, is trusted (see `untrusted_reason`).

    Raises:
        ValueError: one line naming the path and the fix.
    """
    if cfg.load_path is None:
        return
    if not is_remote(cfg.load_path) and not os.path.exists(cfg.load_path):
        raise ValueError(f'load_path {cfg.load_path} not found: pass a checkpoint written by train.py')
    if os.path.isfile(cfg.load_path) and not looks_like_a_checkpoint(cfg.load_path):
        raise ValueError(
            f'load_path {cfg.load_path} is not a PyTorch checkpoint: pass a .pt file (or sharded checkpoint '
            'folder) written by train.py'
        )
    reason = (
        untrusted_reason(cfg.load_path) if is_remote(cfg.load_path) or os.path.isfile(cfg.load_path) else None
    )
    if reason and not cfg.trust_checkpoint:
        raise refusal(cfg.load_path, reason, flag='trust_checkpoint=true')


def check_object_stores(cfg: TrainConfig) -> None:
    """The checkpoint bucket and a remote load_path are reachable, before anything is built.

    Raises:
        ValueError: one line naming the URI.
    """
    if cfg.save_folder is not None and is_remote(cfg.save_folder):
        folder = cfg.save_folder.format(run_name=cfg.run_name or 'run')
        DatasetRoot(folder.split('{')[0])  # Raises StoreError naming the URI when unreachable.
    if cfg.load_path is not None and is_remote(cfg.load_path):
        if not DatasetRoot(cfg.load_path.rsplit('/', 1)[0]).exists(cfg.load_path.rsplit('/', 1)[1]):
            raise ValueError(f'load_path {cfg.load_path} not found: check the URI')


def build_trainer(cfg: TrainConfig, meta: DatasetMetadata) -> Trainer:
    """Builds the model, data, optimisation and system pieces into a Composer Trainer."""
    model_kwargs = dataclasses.asdict(cfg.model)
    if model_kwargs['vocab_size'] is None:
        model_kwargs['vocab_size'] = meta.vocab_size
    model = CDCDComposerModel(
        model=model_kwargs,
        t_min=cfg.diffusion.t_min,
        t_max=cfg.diffusion.t_max,
        eval_noise_levels=tuple(cfg.diffusion.eval_noise_levels),
        masking=cfg.masking,
        pad_id=meta.pad_id,
        mse_weight=cfg.loss.mse_weight,
    )
    log.info('model: %.2fM non-embedding parameters', model.model.non_embedding_parameters() / 1e6)

    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ValueError(
            f'global_train_batch_size={cfg.global_train_batch_size} is not divisible by {world} devices'
        )
    per_device = cfg.global_train_batch_size // world
    data_root, cache = cfg.data.root, cfg.data.local_cache
    train_loader = build_dataloader(
        data_root,
        cfg.data.train_split,
        per_device,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        local_cache=cache,
    )
    eval_loader = build_dataloader(
        data_root,
        cfg.data.eval_split,
        cfg.device_eval_batch_size,
        shuffle=False,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        local_cache=cache,
        drop_last=False,
    )
    evaluator = Evaluator(label='eval', dataloader=eval_loader, metric_names=list(model.get_metrics()))

    optimizer = registry.build_optimizer(model, cfg.optimizer)
    scheduler = registry.build(
        'scheduler', cfg.scheduler['name'], {k: v for k, v in cfg.scheduler.items() if k != 'name'}
    )
    algorithms = [registry.build('algorithms', n, kw) for n, kw in registry.enabled(cfg.algorithms).items()]
    loggers = [registry.build('loggers', n, kw) for n, kw in registry.enabled(cfg.loggers).items()]
    tokenizer = load_tokenizer(os.path.join(fetch_dataset_files(data_root, cache), 'tokenizer'))
    self_conditioning = registry.enabled(cfg.algorithms).get('self_conditioning')
    metadata = {
        'model': model_kwargs,
        # generate.py feeds x0_hat back by default when the model was trained with it.
        'self_conditioning': None if self_conditioning is None else self_conditioning.get('p', 0.5),
        'diffusion': dataclasses.asdict(cfg.diffusion),
        'dataset': dataclasses.asdict(meta),
        'tokenizer': tokenizer_to_json(tokenizer),
    }
    callbacks = [registry.build('callbacks', n, kw) for n, kw in registry.enabled(cfg.callbacks).items()]
    callbacks += [RunMetadata(metadata), BatchNoiseSeed()]

    precision = cfg.precision or ('amp_bf16' if torch.cuda.is_available() else 'fp32')
    try:
        return Trainer(
            run_name=cfg.run_name,
            model=model,
            # SpeedMonitor counts tokens through the DataSpec (our batches have no `input_ids`).
            train_dataloader=DataSpec(
                train_loader, get_num_tokens_in_batch=lambda batch: batch['tokens'].numel()
            ),
            eval_dataloader=evaluator,
            eval_interval=cfg.eval_interval,
            eval_subset_num_batches=cfg.eval_subset_num_batches,
            max_duration=cfg.max_duration,
            optimizers=optimizer,
            schedulers=scheduler,
            algorithms=algorithms,
            callbacks=callbacks,
            loggers=loggers,
            precision=precision,
            device=cfg.device,
            device_train_microbatch_size=cfg.device_train_microbatch_size or per_device,
            progress_bar=cfg.progress_bar,
            log_to_console=cfg.log_to_console,
            console_log_interval=cfg.console_log_interval,
            save_folder=cfg.save_folder,
            save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
            save_overwrite=cfg.save_overwrite,
            autoresume=cfg.autoresume,
            load_path=cfg.load_path,
            load_weights_only=cfg.load_weights_only,
            parallelism_config=cfg.parallelism_config,
            compile_config=cfg.compile_config,
            seed=cfg.seed,
            dist_timeout=cfg.dist_timeout,
        )
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if not (cfg.autoresume or cfg.load_path):
            raise
        raise unloadable_checkpoint(cfg, e) from e


def main(
    cfg: dict[str, Any] | TrainConfig, return_trainer: bool = False, do_train: bool = True
) -> Trainer | None:
    """Validates the config, builds everything and trains.

    Args:
        cfg: A resolved config dict (from `load_config`) or a `TrainConfig`.
        return_trainer: Return the Trainer (tests inspect it).
        do_train: Call `fit()`; False only builds.
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else parse_config(cfg)
    trainer = run(cfg, validate(cfg), do_train)
    return trainer if return_trainer else None


def configure_upload_retries(attempts: int) -> None:
    """Lets object-store transfers (checkpoint uploads above all) outlast an outage.

    Composer's uploaders retry only errors their object store marks transient, and the S3 store
    leaves retrying to boto3 (3 attempts by default). boto3 reads its attempt count from
    `AWS_MAX_ATTEMPTS`, which the upload processes inherit; a value the user set wins.
    """
    os.environ.setdefault('AWS_MAX_ATTEMPTS', str(attempts))


def run(cfg: TrainConfig, meta: DatasetMetadata, do_train: bool = True) -> Trainer:
    """Builds the Trainer for a validated config and trains."""
    configure_upload_retries(cfg.upload_attempts)
    # FSDP2 (per-parameter DTensor sharding) is the tested path: it runs on CPU/gloo in CI as on GPUs.
    os.environ.setdefault('FSDP_VERSION', fsdp_version())
    reproducibility.seed_all(cfg.seed)
    if not dist.is_initialized():
        # Streaming needs the process group before the datasets are built.
        dist.initialize_dist(get_device(cfg.device), timeout=cfg.dist_timeout)
    clean_shared_memory()
    trainer = build_trainer(cfg, meta)
    if do_train:
        trainer.fit()
    return trainer


def cli(argv: list[str]) -> None:
    """`train.py CONFIG.yaml [key.sub=value ...]`; config errors exit with one line."""
    if not argv or argv[0] in ('-h', '--help'):
        sys.exit('usage: composer train.py yamls/cdcd-tiny.yaml [key.sub=value ...]')
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    try:
        cfg = parse_config(load_config(argv[0], argv[1:]))
        meta = validate(cfg)
    except ValueError as e:
        sys.exit(f'config error: {e}')
    try:
        trainer = run(cfg, meta, do_train=False)
    except ValueError as e:  # e.g. a damaged checkpoint to resume from
        sys.exit(f'error: {e}')
    trainer.fit()


if __name__ == '__main__':
    cli(sys.argv[1:])
