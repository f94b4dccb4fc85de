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

GRANULARITIES = ('batch', 'example')


class SelfConditioning(Algorithm):
    """Feeds the model its own stop-gradient estimate x0_hat with probability `p`.

    At BEFORE_FORWARD the batch is corrupted once (t, noise and conditioning mask are drawn
    and stored in the batch), the denoiser runs without gradient under the run's precision on
    the chosen examples, and `self_cond = softmax(logits) @ E` (zero at given positions) is put
    in the batch for them; the others get zeros. The training forward then reuses exactly the
    same corruption. Either way a fraction `p` of the examples is trained with self-conditioning
    in expectation, as in the paper.

    - `per='example'` (default; Plaid's variant): `round(p * B)` examples of every microbatch,
      chosen by a generator seeded by (seed, rank, batch, microbatch). Every microbatch pays a
      whole pass's kernel launches for p of its FLOPs.
    - `per='batch'` (Analog Bits' Algorithm 1): one coin per optimizer batch, seeded by (seed,
      batch index), so every rank and every microbatch of the batch agree. A batch with heads
      runs one no-grad pass over each whole microbatch; one with tails runs none: `p` passes per
      microbatch on average, fewer launches where a GPU is launch-bound (`python bench/train.py
      --overhead --set algorithms.self_conditioning.per=batch`). It recognised fewer sentences
      than `example` on both seeds of the ablation in docs/ablations.md, so it is not the default.

    Both draws depend only on the seed and the position in training: identical after a resume,
    with no state to checkpoint, and the same forward calls and shapes on every rank (no
    per-rank coin that could hang FSDP).

    Args:
        p: Fraction of examples trained with self-conditioning (paper: 0.5).
        per: What one draw decides, `batch` or `example`.
    """

    def __init__(self, p: float = 0.5, per: str = 'example') -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'algorithms.self_conditioning.p={p} must lie in [0, 1]')
        if per not in GRANULARITIES:
            raise ValueError(
                f'algorithms.self_conditioning.per={per!r} must be one of {", ".join(GRANULARITIES)}'
            )
        self.p, self.per = p, per
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
        if self.per == 'batch':
            if self._batch_heads(state):
                batch['self_cond'] = self._estimate(model, batch, state)
        else:
            batch['self_cond'] = self._estimate_on_subset(model, batch, state)
        state.batch = batch

    def _estimate(self, model, batch: dict, state: State) -> torch.Tensor:
        """x0_hat of a corrupted batch (B, L, d_embed), zero at given positions, without gradient."""
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            x0_hat = model.denoise(batch, expected_embedding=True).x0_hat
        given = ~batch['generate_mask'].bool()
        return x0_hat.to(batch['self_cond'].dtype).masked_fill(given[..., None], 0.0)

    def _estimate_on_subset(self, model, batch: dict, state: State) -> torch.Tensor:
        """`self_cond` with the estimate on `round(p * B)` chosen examples and zeros elsewhere."""
        size = batch['tokens'].shape[0]
        chosen = torch.randperm(size, generator=self._example_generator(state), device='cpu')
        # Batch order, so p=1 runs the batch as is; copied without waiting for the device.
        chosen = chosen[: round(self.p * size)].sort().values.to(batch['tokens'].device, non_blocking=True)
        self_cond = torch.zeros_like(batch['self_cond'])
        if len(chosen):
            subset = {
                key: batch[key][chosen] for key in ('tokens', 't', 'generate_mask', 'self_cond', 'noise')
            }
            self_cond[chosen] = self._estimate(model, subset, state)
        return self_cond

    def _batch_heads(self, state: State) -> bool:
        """The batch's coin: the same on every rank and microbatch, and after a resume."""
        if self.p in (0.0, 1.0):
            return self.p == 1.0
        key = f'{state.rank_zero_seed}/{int(state.timestamp.batch)}'
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return bool(torch.rand((), generator=generator) < self.p)

    def _example_generator(self, state: State) -> torch.Generator:
        batch_index = int(state.timestamp.batch)
        previous, count = self._microbatch
        self._microbatch = (batch_index, count + 1 if previous == batch_index else 0)
        key = f'{state.rank_zero_seed}/{dist.get_global_rank()}/{batch_index}/{self._microbatch[1]}'
        return torch.Generator().manual_seed(zlib.crc32(key.encode()))
