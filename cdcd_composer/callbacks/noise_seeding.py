"""Per-batch seeding of the corruption, so that a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from cdcd_composer.composer_model import unwrap_model


class BatchNoiseSeed(Callback):
    """Makes each batch's corruption (t, noise, masks) a function of (seed, rank, batch index).

    Composer restores the global RNG on resume only at epoch boundaries; drawing from a
    per-batch generator instead makes a run resumed mid-epoch draw exactly what the
    uninterrupted run drew. `train.py` always installs it.
    """

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """Seeds the model's draws for this batch (at AFTER_DATALOADER: before BATCH_START)."""
        key = f'{state.rank_zero_seed}/{dist.get_global_rank()}/{int(state.timestamp.batch)}'
        unwrap_model(state.model).begin_batch(key)
