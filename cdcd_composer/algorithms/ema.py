"""The EMA Algorithm: evaluates with an exponential moving average of the weights.

The averages themselves (`cdcd_composer.averaged_weights`) live in the model, so that every
checkpoint, sharded or full, carries them; this Algorithm creates, updates and swaps them.
"""

from __future__ import annotations

from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from cdcd_composer import workarounds
from cdcd_composer.averaged_weights import AveragedWeights


class EMA(Algorithm):
    """Keeps an exponential moving average of the weights and evaluates with it.

    `average <- s * average + (1 - s) * weight` after every batch, with `s = 2^(-1 / half_life)`.
    The averages are taken after FSDP2 wraps the model (`BEFORE_LOAD`, so a resumed run loads
    them into the same layout), live in the model (`CDCDComposerModel.ema`) and
    travel in its state dict. They are swapped in for every evaluation; the `TrainingSamples`
    callback and the export use them too.

    Args:
        half_life: Batches after which a weight's contribution halves, as a time string ('1000ba').
    """

    def __init__(self, half_life: str = '1000ba') -> None:
        workarounds.require('EMA')
        try:
            time = Time.from_timestring(half_life)
        except ValueError:
            time = None
        if time is None or time.unit != TimeUnit.BATCH or time.value <= 0:
            raise ValueError(
                f'algorithms.ema.half_life={half_life!r} must be a positive number of batches, e.g. 1000ba'
            )
        self.half_life = half_life
        self.smoothing = 2.0 ** (-1.0 / time.value)
        self.averages: AveragedWeights | None = None  # The model's, once created.

    def match(self, event: Event, state: State) -> bool:
        """Creates the averages before a checkpoint loads, updates them per batch, swaps around evals."""
        return event in (Event.BEFORE_LOAD, Event.BATCH_END, Event.EVAL_START, Event.EVAL_END)

    def apply(self, event: Event, state: State, logger: Logger) -> int | None:
        """See `match`."""
        if event == Event.BEFORE_LOAD:  # After FSDP wrapping, before any DDP wrapper and any load.
            if not hasattr(state.model, 'ema'):
                raise ValueError('algorithms.ema needs a CDCDComposerModel, which holds the averages')
            self.averages = state.model.ema = AveragedWeights(state.model)
            return None
        averages = self.averages
        if event == Event.BATCH_END:
            averages.update(self.smoothing)
        elif event == Event.EVAL_START and not averages.active:
            averages.swap()
        elif event == Event.EVAL_END and averages.active:
            averages.swap()
        return None
