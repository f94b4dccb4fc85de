"""Per-batch seeding of the corruption, so that every sample's draws belong to the sample."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger

from cdcd_composer.composer_model import unwrap_model


class BatchNoiseSeed(Callback):
    """Makes each sample's corruption a function of (seed, epoch, its dataset index) alone.

    t, the noise, the conditioning mask and the self-conditioning coin (`sample_draws`).

    Nothing about ranks, microbatches or the order of draws enters: the same run on any number of
    ranks draws the same numbers for the same sample, and a run resumed mid-epoch, on the same or
    another world size, draws what the uninterrupted run drew. `train.py` always installs it.
    """

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """Seeds the model's draws for this batch (at AFTER_DATALOADER: before BATCH_START)."""
        unwrap_model(state.model).begin_batch(state.rank_zero_seed, int(state.timestamp.epoch))
