"""Samples while training: a Callback that generates a few stories every N batches and logs them."""

from __future__ import annotations

import contextlib
import logging
import time

from composer.core import Callback, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from cdcd_composer.composer_model import unwrap_model
from cdcd_composer.prompting import Request

log = logging.getLogger(__name__)


class TrainingSamples(Callback):
    """Every `interval`, samples `num_samples` stories (half continuing `prompt`) and logs them.

    The table goes to every logger (`log_table`: console, file, W&B...) and each story to the
    Python log. Cost is bounded by `num_samples x steps` forward passes and reported as
    `samples/seconds` and `samples/fraction_of_training` (time spent sampling over wall time).
    With `algorithms.ema` the samples come from the averaged weights. Rank 0 samples alone,
    except under FSDP, where every rank must take part in each forward pass (the parameters are
    sharded); the inputs are seeded, so ranks agree.

    Args:
        interval: How often, as a Composer time string ('500ba').
        num_samples: Stories per event.
        steps: Solver steps (default: the model's own, `RunSpec.default_steps`: 24 of the default
            solver, or the count a distilled student samples with by default).
        prompt: Continuation prompt for half the samples (None: all unconditional).
        seed: Seed of the initial noise (the same every time, so samples show progress).
    """

    def __init__(
        self,
        interval: str = '500ba',
        num_samples: int = 4,
        steps: int | None = None,
        prompt: str | None = 'Once upon a time',
        seed: int = 0,
    ) -> None:
        if num_samples <= 0 or (steps is not None and steps <= 0):
            raise ValueError(
                f'training_samples: num_samples ({num_samples}) and steps ({steps}) must be positive'
            )
        self.should_sample = create_interval_scheduler(
            interval, include_end_of_training=True, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self.num_samples, self.steps, self.prompt, self.seed = num_samples, steps, prompt, seed
        self.sampling_seconds = 0.0
        self._fit_start = time.monotonic()

    def fit_start(self, state: State, logger: Logger) -> None:
        """Starts the wall clock that the sampling cost is compared with."""
        self._fit_start = time.monotonic()

    def batch_end(self, state: State, logger: Logger) -> None:
        """Samples and logs when the interval says so."""
        if not self.should_sample(state, Event.BATCH_END):
            return
        if not state.fsdp_enabled and dist.get_global_rank() != 0:
            return
        start = time.monotonic()
        rows = self._sample(state)
        seconds = time.monotonic() - start
        self.sampling_seconds += seconds
        if dist.get_global_rank() != 0:
            return
        batch = int(state.timestamp.batch)
        logger.log_table(['batch', 'prompt', 'sample'], [[batch, p, s] for p, s in rows], name='samples')
        for prompt, text in rows:
            log.info('sample at batch %d%s: %s', batch, f' ({prompt!r})' if prompt else '', text)
        elapsed = max(time.monotonic() - self._fit_start, 1e-9)
        logger.log_metrics(
            {'samples/seconds': seconds, 'samples/fraction_of_training': self.sampling_seconds / elapsed}
        )

    def _sample(self, state: State) -> list[tuple[str, str]]:
        model = unwrap_model(state.model)
        prompted = self.num_samples // 2 if self.prompt else 0
        groups = [(None, self.num_samples - prompted), (self.prompt, prompted)]
        was_training = model.training
        model.eval()
        rows = []
        # The moving averages of algorithms.ema, as in evaluation and the export.
        weights = model.ema.swapped_in() if model.ema else contextlib.nullcontext()
        try:
            with weights, get_precision_context(state.precision, state.precision_config):
                for prompt, count in groups:
                    if count:
                        texts = model.generate(
                            count, self.steps, request=Request(prompt=prompt), seed=self.seed
                        )
                        rows += [(prompt or '', text) for text in texts]
        finally:
            model.train(was_training)
        return rows
