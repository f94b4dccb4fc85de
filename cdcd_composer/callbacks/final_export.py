"""Writing the weights-only export when training ends, as a Composer Callback."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger, MLFlowLogger, WandBLogger
from composer.utils import dist

from cdcd_composer.arguments import WEIGHT_CHOICES
from cdcd_composer.composer_model import unwrap_model
from cdcd_composer.export import export_size, split_folder, training_progress, write_export
from cdcd_composer.storage import Folder, check_free_space, check_writable, is_remote

log = logging.getLogger(__name__)


def artifact_destinations(logger: Logger) -> list[Any]:
    """The logger destinations that keep artifacts: MLflow runs and W&B runs, where enabled."""
    return [d for d in logger.destinations if isinstance(d, (MLFlowLogger, WandBLogger)) and d._enabled]


def log_export_artifact(destination: Any, folder: str, run_name: str) -> None:
    """Registers a local export directory as an artifact: the MLflow run's `export/`, a W&B model artifact."""
    if isinstance(destination, MLFlowLogger):
        from mlflow import MlflowClient

        MlflowClient(destination.tracking_uri).log_artifacts(
            destination._run_id, folder, artifact_path='export'
        )
    else:
        import wandb

        artifact = wandb.Artifact(name=f'{run_name}-export', type='model')
        artifact.add_dir(folder)
        wandb.log_artifact(artifact)


class FinalExport(Callback):
    """Writes the model's state as a weights-only export at `FIT_END` (see `cdcd_composer.export`).

    Under FSDP every rank takes part in gathering the full state dict; rank 0 writes it, and
    registers it as an artifact with the MLflow and W&B loggers of the run.

    Args:
        folder: Destination, formatted with `{run_name}` (local path or object-store URI).
        weights: 'ema' (default): the moving averages of `algorithms.ema` when the run keeps them,
            else the raw weights; 'raw': the weights as trained. The export's spec says which.
    """

    def __init__(self, folder: str = 'runs/{run_name}/export', weights: str = 'ema') -> None:
        if weights not in WEIGHT_CHOICES:
            raise ValueError(
                f'callbacks.export_weights.weights={weights!r} must be one of {", ".join(WEIGHT_CHOICES)}'
            )
        self.folder = folder
        self.weights = weights

    def check_destination(self, run_name: str) -> None:
        """The export's folder is writable and ours to replace (absent, empty or marked).

        `train.py` calls it before building anything, and rank 0 again at FIT_START.

        Raises:
            StorageError: one line naming the folder and the fix.
        """
        out = self.folder.format(run_name=run_name)
        check_writable(out, 'callbacks.export_weights.folder')
        parent, name = split_folder(out)
        Folder(parent).check_replaceable(name)

    def fit_start(self, state: State, logger: Logger) -> None:
        """Checks the destination, and the room for the export, before training, not after it."""
        if dist.get_global_rank() == 0:
            self.check_destination(state.run_name)
            model = unwrap_model(state.model)
            size = export_size(model.state_dict().values(), model.config.vocab_size)
            out = self.folder.format(run_name=state.run_name)
            check_free_space(out, size, f'callbacks.export_weights.folder {out}')

    def fit_end(self, state: State, logger: Logger) -> None:
        """Gathers the full state dict and writes the export."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if state.fsdp_enabled:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(state.model, options=options)
        else:
            model_state = unwrap_model(state.model).state_dict()
        if dist.get_global_rank() == 0:
            out = self.folder.format(run_name=state.run_name)
            write_export(out, model_state, self.weights, training_progress(state.timestamp))
            logger.log_hyperparameters({'export_folder': out})
            destinations = artifact_destinations(logger)
            if destinations:
                with tempfile.TemporaryDirectory() as tmp:
                    local = out
                    if is_remote(out):  # artifacts are uploaded from a local copy
                        local = f'{tmp}/export'
                        write_export(local, model_state, self.weights, training_progress(state.timestamp))
                    for destination in destinations:
                        log_export_artifact(destination, local, state.run_name)
                        log.info('export logged as an artifact to %s', type(destination).__name__)
        dist.barrier()
