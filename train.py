"""Trains CDCD with Composer: `composer train.py yamls/cdcd-tiny.yaml key.sub=value ...`."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import warnings
from typing import Any

import torch
from composer import DataSpec, Evaluator, Trainer
from composer.utils import dist, get_device, reproducibility

from cdcd_composer import registry
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.config import TrainConfig, load_config, parse_config
from cdcd_composer.data.loaders import (
    build_dataloader,
    check_canvas,
    check_split,
    clean_shared_memory,
    fetch_dataset_files,
    use_node_shm_namespace,
)
from cdcd_composer.data.metadata import DatasetMetadata, check_tokenizer
from cdcd_composer.data.store import check_writable
from cdcd_composer.data.tokenization import load_tokenizer, tokenizer_to_json
from cdcd_composer.loggers import ResumableProgressBar
from cdcd_composer.model import compile_denoiser
from cdcd_composer.noise_seeding import BatchNoiseSeed
from cdcd_composer.preflight import check_object_stores, check_system
from cdcd_composer.resume import (
    check_load_path,
    checkpoint_to_resume,
    checkpoints_in,
    is_sharded_checkpoint_path,
    resolve_autoresume,
    unloadable_checkpoint,
)
from cdcd_composer.sharding import (
    LoadSingleFileCheckpoint,
    ReduceOnLastMicrobatch,
    fix_fsdp2_on_cpu,
    fsdp_version,
    parallelism_for_world,
    trainer_parallelism,
)
from cdcd_composer.trust import UntrustedCheckpoint, guard_checkpoint_loads, refusal

log = logging.getLogger('train')


def validate(cfg: TrainConfig) -> DatasetMetadata:
    """Every check that needs no model and no shards: registry names, keys, data paths, sizes.

    It also points an autoresumed run whose latest checkpoint lacks its pointer at that
    checkpoint (`resolve_autoresume` sets `cfg.load_path`).
    """
    registry.check_sections(cfg)
    splits = {
        split: check_split(cfg.data.root, split) for split in (cfg.data.train_split, cfg.data.eval_split)
    }
    meta = DatasetMetadata.load(fetch_dataset_files(cfg.data.root, cfg.data.local_cache))
    for split, encodings in splits.items():
        check_canvas(cfg.data.root, split, encodings, meta.seq_len, meta.token_dtype)
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


def build_trainer(cfg: TrainConfig, meta: DatasetMetadata) -> Trainer:
    """Builds the model, data, optimisation and system pieces into a Composer Trainer."""
    model_config = dataclasses.asdict(cfg.model) | {'vocab_size': cfg.model.vocab_size or meta.vocab_size}
    tokenizer = load_tokenizer(
        os.path.join(fetch_dataset_files(cfg.data.root, cfg.data.local_cache), 'tokenizer')
    )
    self_conditioning = registry.enabled(cfg.algorithms).get('self_conditioning')
    model = CDCDComposerModel(
        model=model_config,
        t_min=cfg.diffusion.t_min,
        t_max=cfg.diffusion.t_max,
        eval_noise_levels=tuple(cfg.diffusion.eval_noise_levels),
        masking=cfg.masking,
        mse_weight=cfg.loss.mse_weight,
        dataset=meta,
        tokenizer=tokenizer_to_json(tokenizer),
        # generate.py feeds x0_hat back by default when the model was trained with it.
        self_conditioning=None if self_conditioning is None else self_conditioning.get('p', 0.5),
    )
    log.info('model: %.2fM non-embedding parameters', model.model.non_embedding_parameters() / 1e6)

    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ValueError(
            f'global_train_batch_size={cfg.global_train_batch_size} is not divisible by {world} devices'
        )
    per_device = cfg.global_train_batch_size // world
    data = cfg.data
    common = {'seed': cfg.seed, 'num_workers': data.num_workers, 'local_cache': data.local_cache}
    train_loader = build_dataloader(
        data.root, data.train_split, per_device, shuffle=True, num_canonical_nodes=data.num_canonical_nodes,
        shuffle_algo=data.shuffle_algo, **common,
    )  # fmt: skip
    eval_loader = build_dataloader(
        data.root, data.eval_split, cfg.device_eval_batch_size, shuffle=False, drop_last=False, **common
    )
    evaluator = Evaluator(label='eval', dataloader=eval_loader, metric_names=list(model.get_metrics()))

    optimizer = registry.build_optimizer(model, cfg.optimizer)
    scheduler = registry.build(
        'scheduler', cfg.scheduler['name'], {k: v for k, v in cfg.scheduler.items() if k != 'name'}
    )
    algorithms = [registry.build('algorithms', n, kw) for n, kw in registry.enabled(cfg.algorithms).items()]
    loggers = [registry.build('loggers', n, kw) for n, kw in registry.enabled(cfg.loggers).items()]
    if cfg.progress_bar:  # Composer's own cannot resume a sharded checkpoint (cdcd_composer.loggers).
        loggers.append(ResumableProgressBar())
    callbacks = [registry.build('callbacks', n, kw) for n, kw in registry.enabled(cfg.callbacks).items()]
    callbacks.append(BatchNoiseSeed())
    resume_from = checkpoint_to_resume(cfg)
    resume_sharded = resume_from is not None and is_sharded_checkpoint_path(resume_from)
    parallelism = parallelism_for_world(cfg.parallelism_config, world, resume_sharded)
    fsdp = (parallelism or {}).get('fsdp')
    if fsdp is not None and fsdp_version() == '2':
        callbacks.append(ReduceOnLastMicrobatch())
        if resume_from is not None and not resume_sharded and fsdp.get('state_dict_type') == 'sharded':
            callbacks.append(LoadSingleFileCheckpoint())

    precision = cfg.precision or ('amp_bf16' if torch.cuda.is_available() else 'fp32')
    # Composer warns that a progress bar given in `loggers` ignores its own switches; ours is that bar.
    warnings.filterwarnings('ignore', message='Specifying the ProgressBarLogger via `loggers`')
    try:
        trainer = Trainer(
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
            progress_bar=False,  # `loggers` holds the progress bar
            log_to_console=cfg.log_to_console,
            console_log_interval=cfg.console_log_interval,
            save_folder=cfg.save_folder,
            save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
            save_overwrite=cfg.save_overwrite,
            autoresume=cfg.autoresume,
            load_path=cfg.load_path,
            load_weights_only=cfg.load_weights_only,
            parallelism_config=trainer_parallelism(parallelism),
            seed=cfg.seed,
            dist_timeout=cfg.dist_timeout,
        )
    except UntrustedCheckpoint as e:  # Composer loads a copy: name the checkpoint itself
        raise refusal(resume_from or cfg.load_path, e.reason, e.flag) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if not (cfg.autoresume or cfg.load_path):
            raise
        raise unloadable_checkpoint(cfg, e) from e
    if cfg.compile_config is not None:  # After FSDP wrapping, before the first forward.
        compile_denoiser(model.model, cfg.compile_config)
    return trainer


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
    fix_fsdp2_on_cpu()
    guard_checkpoint_loads(cfg.trust_checkpoint)  # autoresume and load_path: weights-only unpickling
    use_node_shm_namespace()
    clean_shared_memory(cfg.data.root, cfg.data.local_cache, (cfg.data.train_split, cfg.data.eval_split))
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
    fit_or_say_where_it_stopped(trainer, cfg)


def fit_or_say_where_it_stopped(trainer: Trainer, cfg: TrainConfig) -> None:
    """`trainer.fit()`; on Ctrl-C, one line: the batch reached, the newest checkpoint, how to go on.

    Raises:
        SystemExit: interrupted (exit status 130, as a shell reports SIGINT).
    """
    try:
        trainer.fit()
    except KeyboardInterrupt:
        batch = int(trainer.state.timestamp.batch)
        folder = cfg.save_folder.format(run_name=cfg.run_name) if cfg.save_folder else None
        newest = checkpoints_in(folder)[-1:] if folder else []
        if not newest:
            where = 'no checkpoint was kept, so a rerun starts afresh'
        elif cfg.autoresume:
            where = f'the newest checkpoint is {folder}/{newest[0]}: the same command resumes from it'
        else:
            where = f'the newest checkpoint is {folder}/{newest[0]}: add autoresume=true to resume from it'
        print(f'interrupted at batch {batch}; {where}', file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == '__main__':
    cli(sys.argv[1:])
