"""`composer train.py CONFIG.yaml [key.sub=value ...]`: validates a config, builds the Trainer, trains."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import sys
import warnings
from typing import Any

from composer import DataSpec, Evaluator, Trainer
from composer.core import Callback, Time, TimeUnit
from composer.utils import dist, get_device, reproducibility
from transformers import PreTrainedTokenizerBase

from cdcd_composer import registry, workarounds
from cdcd_composer.algorithms import Distillation
from cdcd_composer.arguments import answer_train_usage
from cdcd_composer.callbacks import BatchNoiseSeed, FinalExport
from cdcd_composer.callbacks.checkpoint_space import CheckpointSpace
from cdcd_composer.callbacks.sharding import LoadSingleFileCheckpoint, ReduceOnLastMicrobatch
from cdcd_composer.checkpoints.loading import is_sharded_checkpoint
from cdcd_composer.checkpoints.resume import (
    check_load_path,
    checkpoint_to_resume,
    checkpoints_in,
    resolve_autoresume,
    unloadable_checkpoint,
)
from cdcd_composer.checkpoints.trust import UntrustedCheckpoint, refusal
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.config import TrainConfig, load_config, parse_config
from cdcd_composer.data.loaders import (
    build_dataloader,
    check_canvas,
    check_split,
    clean_shared_memory,
    fetch_dataset_files,
)
from cdcd_composer.data.metadata import TOKENIZER_DIR, DatasetMetadata, check_tokenizer
from cdcd_composer.data.tokenization import load_tokenizer, tokenizer_to_json
from cdcd_composer.loggers import ResumableProgressBar, check_loggers
from cdcd_composer.model import compile_denoiser
from cdcd_composer.outputs import USAGE_ERROR, WORK_FAILED, error_line, failed_while_working
from cdcd_composer.preflight import check_object_stores, check_system, default_precision, trains_on_gpu
from cdcd_composer.sharding import fsdp_version, parallelism_for_world, trainer_parallelism
from cdcd_composer.storage import Folder, StorageError, check_writable, storage_fault

log = logging.getLogger('train')


@dataclasses.dataclass(frozen=True)
class ValidatedRun:
    """A config that passed every check, with what the checks read: the dataset's metadata and tokenizer.

    Attributes:
        cfg: The config; under autoresume its `load_path` may point at the newest complete
            checkpoint of a run that lacks its `latest-rank0.pt` pointer (`resolve_autoresume`).
        meta: The dataset's `cdcd_dataset.json`.
        tokenizer: The dataset's tokenizer.
    """

    cfg: TrainConfig
    meta: DatasetMetadata
    tokenizer: PreTrainedTokenizerBase


def validate(cfg: TrainConfig) -> ValidatedRun:
    """Every check that needs no model and no shards: registry names, keys, data paths, sizes.

    Raises:
        ValueError: one line naming the key or path and the fix.
    """
    registry.check_sections(cfg)
    splits = {
        split: check_split(cfg.data.root, split) for split in (cfg.data.train_split, cfg.data.eval_split)
    }
    local = fetch_dataset_files(cfg.data.root, cfg.data.local_cache)
    meta = DatasetMetadata.load(local)
    for split, encodings in splits.items():
        check_canvas(cfg.data.root, split, encodings, meta.seq_len, meta.token_dtype)
    check_object_stores(cfg)
    if cfg.save_folder is not None:
        check_writable(cfg.save_folder.format(run_name=cfg.run_name or 'run'), 'save_folder')
    check_load_path(cfg)
    export = registry.enabled(cfg.callbacks).get('export_weights')
    if export is not None and cfg.run_name:  # without a run_name the folder is a new random one
        FinalExport(**export).check_destination(cfg.run_name)
    cfg = resolve_autoresume(cfg)
    check_system(cfg)
    check_loggers(registry.enabled(cfg.loggers))
    check_averaging_horizon(cfg)
    check_data_fits(cfg, meta)
    tokenizer = load_tokenizer(os.path.join(local, TOKENIZER_DIR))
    check_tokenizer(meta, tokenizer, f'{TOKENIZER_DIR}/', cfg.data.root)
    return ValidatedRun(cfg, meta, tokenizer)


def check_averaging_horizon(cfg: TrainConfig) -> None:
    """Says, in one warning line, when the EMA's half-life is long against the run.

    Its evaluations and export then hold mostly the initial weights: their share of the average
    after the run is 2^(-max_duration / half_life).
    """
    ema = registry.enabled(cfg.algorithms).get('ema')
    duration = Time.from_timestring(cfg.max_duration)
    if ema is None or duration.unit != TimeUnit.BATCH:
        return
    half_life = Time.from_timestring(ema.get('half_life', '1000ba'))
    if half_life.unit == TimeUnit.BATCH and half_life.value > duration.value / 4:
        share = 2.0 ** (-duration.value / half_life.value)
        log.warning(
            'algorithms.ema.half_life=%s against max_duration=%s: the averaged weights the run evaluates and '
            'exports keep %.0f%% of the initial ones; use a half-life of at most max_duration / 10 (or '
            'export with --weights raw)', ema.get('half_life', '1000ba'), cfg.max_duration, 100 * share,
        )  # fmt: skip


def check_data_fits(cfg: TrainConfig, meta: DatasetMetadata) -> None:
    """The model's vocabulary, the sequence length and the batch size fit the dataset.

    Raises:
        ValueError: one line naming the key and the fix.
    """
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != meta.vocab_size:
        raise ValueError(
            f'model.vocab_size={cfg.model.vocab_size} does not match the dataset vocabulary '
            f'({meta.vocab_size}); set model.vocab_size=null to take it from the data'
        )
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


def build_model(run: ValidatedRun, algorithms: list) -> CDCDComposerModel:
    """The ComposerModel the config describes, its vocabulary taken from the data when unset.

    A distillation's student starts as its teacher (`Distillation.init_student`).
    """
    cfg = run.cfg
    self_conditioning = registry.enabled(cfg.algorithms).get('self_conditioning')
    model = CDCDComposerModel(
        model=dataclasses.asdict(cfg.model) | {'vocab_size': cfg.model.vocab_size or run.meta.vocab_size},
        t_min=cfg.diffusion.t_min,
        t_max=cfg.diffusion.t_max,
        eval_noise_levels=tuple(cfg.diffusion.eval_noise_levels),
        masking=cfg.masking,
        mse_weight=cfg.loss.mse_weight,
        dataset=run.meta,
        tokenizer=tokenizer_to_json(run.tokenizer),
        # generate.py feeds x0_hat back by default when the model was trained with it.
        self_conditioning=None if self_conditioning is None else self_conditioning.get('p', 0.5),
    )
    for algorithm in algorithms:
        if isinstance(algorithm, Distillation):
            algorithm.init_student(model)
    log.info('model: %.2fM non-embedding parameters', model.model.non_embedding_parameters() / 1e6)
    return model


def per_device_batch_size(cfg: TrainConfig) -> int:
    """`global_train_batch_size` over the processes.

    Raises:
        ValueError: it does not divide evenly.
    """
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ValueError(
            f'global_train_batch_size={cfg.global_train_batch_size} is not divisible by {world} devices'
        )
    return cfg.global_train_batch_size // world


def build_data(cfg: TrainConfig, model: CDCDComposerModel) -> tuple[DataSpec, Evaluator]:
    """The training DataSpec (shuffled, this rank's share) and the evaluator of every model metric."""
    data = cfg.data
    common = {'seed': cfg.seed, 'num_workers': data.num_workers, 'local_cache': data.local_cache}
    train_loader = build_dataloader(
        data.root, data.train_split, per_device_batch_size(cfg), shuffle=True,
        num_canonical_nodes=data.num_canonical_nodes, shuffle_algo=data.shuffle_algo, **common,
    )  # fmt: skip
    eval_loader = build_dataloader(
        data.root, data.eval_split, cfg.device_eval_batch_size, shuffle=False, drop_last=False, **common
    )
    # SpeedMonitor counts tokens through the DataSpec (our batches have no `input_ids`).
    train = DataSpec(train_loader, get_num_tokens_in_batch=lambda batch: batch['tokens'].numel())
    return train, Evaluator(label='eval', dataloader=eval_loader, metric_names=list(model.get_metrics()))


def build_callbacks(cfg: TrainConfig, parallelism: dict[str, Any] | None, resume_from: str | None) -> list:
    """The YAML's callbacks, plus those every run (or every FSDP2 run) needs."""
    callbacks: list[Callback] = [
        registry.build('callbacks', n, kw) for n, kw in registry.enabled(cfg.callbacks).items()
    ]
    callbacks.append(BatchNoiseSeed())
    if cfg.save_folder:
        callbacks.append(CheckpointSpace())
    fsdp = (parallelism or {}).get('fsdp')
    if fsdp is not None and fsdp_version() == '2':
        callbacks.append(ReduceOnLastMicrobatch())
        resume_single_file = resume_from is not None and not is_sharded_checkpoint(resume_from)
        if resume_single_file and fsdp.get('state_dict_type') == 'sharded':
            callbacks.append(LoadSingleFileCheckpoint())
    return callbacks


def build_algorithms(cfg: TrainConfig) -> list:
    """The YAML's algorithms."""
    return [registry.build('algorithms', n, kw) for n, kw in registry.enabled(cfg.algorithms).items()]


def build_loggers(cfg: TrainConfig) -> list:
    """The YAML's loggers, and the progress bar (Composer's own cannot resume a sharded checkpoint)."""
    loggers = [registry.build('loggers', n, kw) for n, kw in registry.enabled(cfg.loggers).items()]
    if cfg.progress_bar:
        loggers.append(ResumableProgressBar())
    # Composer warns that a progress bar given in `loggers` ignores its own switches; ours is that bar.
    warnings.filterwarnings('ignore', message='Specifying the ProgressBarLogger via `loggers`')
    return loggers


def system_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """The Trainer's arguments that come straight from the config: duration, checkpoints, system."""
    names = (
        'run_name', 'eval_interval', 'eval_subset_num_batches', 'max_duration', 'device', 'log_to_console',
        'console_log_interval', 'save_folder', 'save_interval', 'save_num_checkpoints_to_keep',
        'save_overwrite', 'autoresume', 'load_path', 'load_weights_only', 'seed', 'dist_timeout',
    )  # fmt: skip
    return {name: getattr(cfg, name) for name in names}


def build_trainer(run: ValidatedRun) -> Trainer:
    """Builds the model, data, optimisation and system pieces into a Composer Trainer.

    Raises:
        ValueError: the checkpoint to resume from is refused or unloadable (one line naming it).
    """
    cfg = run.cfg
    algorithms = build_algorithms(cfg)
    model = build_model(run, algorithms)
    train_data, evaluator = build_data(cfg, model)
    resume_from = checkpoint_to_resume(cfg)
    resume_sharded = resume_from is not None and is_sharded_checkpoint(resume_from)
    parallelism = parallelism_for_world(cfg.parallelism_config, dist.get_world_size(), resume_sharded)
    try:
        trainer = Trainer(
            model=model,
            train_dataloader=train_data,
            eval_dataloader=evaluator,
            optimizers=registry.build_optimizer(model, cfg.optimizer),
            schedulers=registry.build(
                'scheduler', cfg.scheduler['name'], {k: v for k, v in cfg.scheduler.items() if k != 'name'}
            ),
            algorithms=algorithms,
            callbacks=build_callbacks(cfg, parallelism, resume_from),
            loggers=build_loggers(cfg),
            progress_bar=False,  # `loggers` holds the progress bar
            precision=cfg.precision or default_precision(cfg.device),
            device_train_microbatch_size=cfg.device_train_microbatch_size or per_device_batch_size(cfg),
            parallelism_config=trainer_parallelism(parallelism),
            **system_arguments(cfg),
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


def configure_upload_retries(attempts: int) -> None:
    """Lets object-store transfers (checkpoint uploads above all) outlast an outage.

    Composer's uploaders retry only errors their object store marks transient, and the S3 store
    leaves retrying to boto3 (3 attempts by default). boto3 reads its attempt count from
    `AWS_MAX_ATTEMPTS`, which the upload processes inherit; a value the user set wins.
    """
    os.environ.setdefault('AWS_MAX_ATTEMPTS', str(attempts))


HELD_FOLDERS = contextlib.ExitStack()  # the save folder's lock, from setup to the end of the run


def hold_save_folder(cfg: TrainConfig) -> None:
    """One writer per save folder: it stays locked (`Folder.lock`) while the run lives.

    A local lock goes when the run ends or its process dies (the OS releases it, SIGKILL
    included); an object store's lease when the run ends or 120 s after its process died.

    Raises:
        StorageError: a live run holds the folder (one line naming its pid and the lock).
    """
    if not cfg.save_folder or (not cfg.run_name and '{run_name}' in cfg.save_folder):
        return  # no folder, or a new random one
    folder = cfg.save_folder.format(run_name=cfg.run_name)
    HELD_FOLDERS.enter_context(Folder(folder).lock())


def prepare_process(cfg: TrainConfig) -> None:
    """This process's setup before anything is built: seeds, the process group, dependency workarounds."""
    configure_upload_retries(cfg.upload_attempts)
    # FSDP2 (per-parameter DTensor sharding) is the tested path: it runs on CPU/gloo in CI as on GPUs.
    os.environ.setdefault('FSDP_VERSION', fsdp_version())
    reproducibility.seed_all(cfg.seed)
    if not dist.is_initialized():
        # Streaming needs the process group before the datasets are built.
        dist.initialize_dist(get_device(cfg.device), timeout=cfg.dist_timeout)
    workarounds.apply_all(trust_checkpoint=cfg.trust_checkpoint, on_cpu=not trains_on_gpu(cfg.device))
    if dist.get_global_rank() == 0:
        hold_save_folder(cfg)
    clean_shared_memory(cfg.data.root, cfg.data.local_cache, (cfg.data.train_split, cfg.data.eval_split))


def build(run: ValidatedRun) -> Trainer:
    """Sets up this process and builds the Trainer for a validated config."""
    prepare_process(run.cfg)
    return build_trainer(run)


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
    try:
        trainer = build(validate(cfg))
        if do_train:
            trainer.fit()
    finally:
        HELD_FOLDERS.close()  # in-process runs (tests, notebooks) hand the folder on
    return trainer if return_trainer else None


def cli(argv: list[str]) -> None:
    """`train.py CONFIG.yaml [key=value ...]`: exit 2 on a usage or config error (one line), 1 on failure."""
    answer_train_usage(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    try:
        run = validate(parse_config(load_config(argv[0], argv[1:])))
    except ValueError as e:
        print(f'config error: {e}', file=sys.stderr)
        sys.exit(USAGE_ERROR)
    try:
        trainer = build(run)
    except (ValueError, OSError) as e:  # a damaged checkpoint to resume from, a full disk at start
        print(
            f'error: {e if isinstance(e, ValueError) else storage_fault(e) or error_line(e)}', file=sys.stderr
        )
        sys.exit(WORK_FAILED if failed_while_working(e) or storage_fault(e) else USAGE_ERROR)
    fit_or_say_where_it_stopped(trainer, run.cfg)


def fit_or_say_where_it_stopped(trainer: Trainer, cfg: TrainConfig) -> None:
    """`trainer.fit()`; on Ctrl-C or a storage failure, one line saying where the run stands.

    The line says what happened, what was removed (a checkpoint left incomplete), the batch
    reached, the newest checkpoint and how to go on.

    Raises:
        SystemExit: interrupted (exit status 130, as a shell reports SIGINT), or a folder refused at
            FIT_START, a full disk, a failing device or a lost object store (status 1).
    """
    try:
        trainer.fit()
    except KeyboardInterrupt:
        print(f'interrupted at batch {where_it_stands(trainer, cfg)}', file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        fault = storage_fault(e)
        if not isinstance(e, (StorageError, OSError)) and fault is None:
            raise
        what = str(e) if isinstance(e, StorageError) else fault or error_line(e)
        space = next((c for c in trainer.state.callbacks if isinstance(c, CheckpointSpace)), None)
        removed = space.remove_partial() if space is not None else None
        what += f'; removed the incomplete checkpoint {removed}' if removed else ''
        print(f'error: {what}; stopped at batch {where_it_stands(trainer, cfg)}', file=sys.stderr)
        raise SystemExit(1) from None


def where_it_stands(trainer: Trainer, cfg: TrainConfig) -> str:
    """'N; the newest checkpoint is ...: how to resume' for a run that stopped early."""
    batch = int(trainer.state.timestamp.batch)
    folder = cfg.save_folder.format(run_name=cfg.run_name) if cfg.save_folder else None
    newest = checkpoints_in(folder)[-1:] if folder else []
    if not newest:
        return f'{batch}; no checkpoint was kept, so a rerun starts afresh'
    if cfg.autoresume:
        return f'{batch}; the newest checkpoint is {folder}/{newest[0]}: the same command resumes from it'
    return f'{batch}; the newest checkpoint is {folder}/{newest[0]}: add autoresume=true to resume from it'
