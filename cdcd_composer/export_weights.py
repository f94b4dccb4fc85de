"""Writing the weights-only export when training ends, as a Composer Callback."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cdcd_composer.composer_model import unwrap_model
from cdcd_composer.data.store import DatasetRoot, check_writable
from cdcd_composer.export import split_folder, write_export


class ExportWeights(Callback):
    """Writes the model's state as a weights-only export at `FIT_END` (see `cdcd_composer.export`).

    Under FSDP every rank takes part in gathering the full state dict; rank 0 writes it.

    Args:
        folder: Destination, formatted with `{run_name}` (local path or object-store URI).
    """

    def __init__(self, folder: str = 'runs/{run_name}/export') -> None:
        self.folder = folder

    def fit_start(self, state: State, logger: Logger) -> None:
        """Checks the destination before training, not after it: writable, and ours to replace."""
        if dist.get_global_rank() == 0:
            out = self.folder.format(run_name=state.run_name)
            check_writable(out, 'callbacks.export_weights.folder')
            parent, name = split_folder(out)
            DatasetRoot(parent).check_replaceable(name)

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
            write_export(out, model_state)
            logger.log_hyperparameters({'export_folder': out})
        dist.barrier()
