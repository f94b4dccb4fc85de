"""Self-conditioning (paper §4.3; Analog Bits) as a Composer Algorithm."""

from __future__ import annotations

import logging
import zlib

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist

from cdcd_composer.composer_model import unwrap_model

log = logging.getLogger(__name__)


class SelfConditioning(Algorithm):
    """Feeds the model its own stop-gradient estimate x0_hat for a fraction `p` of each batch.

    At BEFORE_FORWARD the batch is corrupted once (t, noise and conditioning mask are drawn
    and stored in the batch), `round(p * B)` examples are chosen, the denoiser runs on them
    without gradient under the run's precision, and `self_cond = softmax(logits) @ E` (zero at
    given positions) is put in the batch for those examples; the others get zeros. The
    training forward then reuses exactly the same corruption.

    Only the chosen examples take the extra pass (Plaid's cheaper variant). The number chosen
    depends only on the batch size, so every rank makes the same forward calls with the same
    shapes whatever its random draws (no per-rank coin that could hang FSDP). Which examples
    are chosen is drawn from a generator seeded by (seed, rank, batch, microbatch): reproducible
    and identical after a resume, with no state to checkpoint.

    Args:
        p: Fraction of examples trained with self-conditioning (paper: 0.5).
    """

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'algorithms.self_conditioning.p={p} must lie in [0, 1]')
        self.p = p
        self._microbatch = (-1, 0)  # (batch index, microbatch index within it)

    def match(self, event: Event, state: State) -> bool:
        """Runs at INIT (to register its FLOPs) and before every training forward."""
        return event in (Event.INIT, Event.BEFORE_FORWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Adds `self_cond` (and the corruption it was computed for) to `state.batch`."""
        model = unwrap_model(state.model)
        if event == Event.INIT:
            model.extra_forward_fraction = self.p
            return
        batch = model.corrupt(state.batch)
        tokens = batch['tokens']
        size = tokens.shape[0]
        chosen = torch.randperm(size, generator=self._generator(state), device='cpu')[: round(self.p * size)]
        # Batch order, so p=1 runs the batch as is; copied without waiting for the device.
        chosen = chosen.sort().values.to(tokens.device, non_blocking=True)
        self_cond = torch.zeros_like(batch['self_cond'])
        if len(chosen):
            with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
                subset = {
                    key: batch[key][chosen] for key in ('tokens', 't', 'generate_mask', 'self_cond', 'noise')
                }
                x0_hat = model.denoise(subset, expected_embedding=True).x0_hat
            given = ~batch['generate_mask'][chosen].bool()
            self_cond[chosen] = x0_hat.to(self_cond.dtype).masked_fill(given[..., None], 0.0)
        batch['self_cond'] = self_cond
        state.batch = batch

    def _generator(self, state: State) -> torch.Generator:
        batch_index = int(state.timestamp.batch)
        previous, count = self._microbatch
        self._microbatch = (batch_index, count + 1 if previous == batch_index else 0)
        key = f'{state.rank_zero_seed}/{dist.get_global_rank()}/{batch_index}/{self._microbatch[1]}'
        return torch.Generator().manual_seed(zlib.crc32(key.encode()))
