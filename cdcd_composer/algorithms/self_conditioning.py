"""Self-conditioning (paper §4.3; Analog Bits) as a Composer Algorithm."""

from __future__ import annotations

import logging
import zlib

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from cdcd_composer import sample_draws
from cdcd_composer.composer_model import ROW_KEYS, unwrap_model
from cdcd_composer.data.loaders import HOST_INDEX

log = logging.getLogger(__name__)

GRANULARITIES = ('batch', 'example')


class SelfConditioning(Algorithm):
    """Feeds the model its own stop-gradient estimate x0_hat with probability `p`.

    The batch is corrupted once (t, noise and conditioning mask are drawn and stored in the
    batch), the denoiser runs without gradient under the run's precision on the chosen examples,
    and `self_cond = softmax(logits) @ E` (zero at given positions) is put in the batch for them;
    the others get zeros. The training forward then reuses exactly the same corruption. Either
    way a fraction `p` of the examples is trained with self-conditioning in expectation, as in
    the paper.

    - `per='example'` (default, every shipped YAML; Plaid's variant): each example's own coin,
      heads with probability p, drawn from (seed, epoch, its dataset index) like the rest of its
      corruption (`sample_draws`), so which examples are chosen does not depend on ranks or
      microbatches. At BATCH_START the device batch is corrupted and one no-grad pass over its
      chosen examples computes their estimates (the weights do not change within a batch): a
      batch of k microbatches pays one pass's kernel launches, not k, at the memory of a no-grad
      pass over p of the device batch. The coins are tossed on the host (from the batch's
      host-side indices), so nothing waits for the device; a batch without heads still runs a
      pass over one example, so every rank makes the same forward calls.
    - `per='batch'` (Analog Bits' Algorithm 1; the ablation in docs/ablations.md): one coin per
      optimizer batch, seeded by (seed, batch index), so every rank and every microbatch of the
      batch agree. A batch with heads runs one no-grad pass over each whole microbatch at
      BEFORE_FORWARD; one with tails runs none. It recognised fewer sentences than `example` on
      both seeds of the ablation, so it is not the default.

    Both draws depend only on the seed and the samples (or the batch index): identical after a
    resume, on any number of ranks, with no state to checkpoint, and the same forward calls on
    every rank (no per-rank skipped pass that could hang FSDP).

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

    def match(self, event: Event, state: State) -> bool:
        """Runs at INIT (to register its FLOPs), then at BATCH_START (per example) or BEFORE_FORWARD."""
        return event in (Event.INIT, Event.BEFORE_FORWARD if self.per == 'batch' else Event.BATCH_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Adds `self_cond` (and the corruption it was computed for) to `state.batch`."""
        model = unwrap_model(state.model)
        if event == Event.INIT:
            model.extra_forward_fraction += self.p
        elif event == Event.BATCH_START:
            state.batch = self._per_example(model, state)
        else:
            batch = model.corrupt(state.batch)
            if self._batch_heads(state):
                batch['self_cond'] = self._estimate(model, batch, state)
            state.batch = batch

    def _estimate(self, model, batch: dict, state: State) -> torch.Tensor:
        """x0_hat of a corrupted batch (B, L, d_embed), zero at given positions, without gradient."""
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            x0_hat = model.denoise(batch, expected_embedding=True).x0_hat
        given = ~batch['generate_mask'].bool()
        return x0_hat.to(batch['self_cond'].dtype).masked_fill(given[..., None], 0.0)

    def _choose(self, model, batch: dict) -> torch.Tensor:
        """The indices of the examples whose coin (probability p) came up heads, in batch order.

        Tossed on the host from the batch's host-side indices (`collate_stories`), so nothing waits
        for the device; a batch without them (built by hand) tosses the global generator's coins.
        """
        tokens = batch['tokens']
        if model.noise_seed is not None and HOST_INDEX in batch:
            draws = sample_draws.SampleDraws(*model.noise_seed, torch.tensor(batch[HOST_INDEX]))
            u = draws.uniform(sample_draws.COIN, 1)[:, 0]
        else:
            u = torch.rand(len(tokens))
        chosen = torch.nonzero(u < self.p).squeeze(1)
        return chosen.to(tokens.device, non_blocking=True)

    def _estimate_chosen(
        self, model, batch: dict, chosen: torch.Tensor, self_cond: torch.Tensor, state: State
    ) -> None:
        """Writes the estimates of the `chosen` examples of a corrupted batch into `self_cond` (B, L, d).

        With none chosen, a pass over the first example runs and is dropped: every rank makes the
        same forward calls (FSDP gathers parameters in them).
        """
        keys = [key for key in ROW_KEYS if key in batch]
        subset = {key: batch[key][chosen] if len(chosen) else batch[key][:1] for key in keys}
        estimate = self._estimate(model, subset, state)
        if len(chosen):
            self_cond[chosen] = estimate

    def _per_example(self, model, state: State) -> dict[str, torch.Tensor]:
        """The device batch corrupted, with the estimates of its chosen examples from one pass.

        Every draw belongs to its sample, so corrupting the device batch at once draws what
        corrupting each microbatch would, and the same examples are chosen.
        """
        batch = model.corrupt(state.device.batch_to_device(state.batch))
        if self.p > 0:  # p = 0: no coin comes up heads on any rank, and no pass runs
            self._estimate_chosen(model, batch, self._choose(model, batch), batch['self_cond'], state)
        return batch

    def _batch_heads(self, state: State) -> bool:
        """The batch's coin: the same on every rank and microbatch, and after a resume."""
        if self.p in (0.0, 1.0):
            return self.p == 1.0
        key = f'{state.rank_zero_seed}/{int(state.timestamp.batch)}'
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return bool(torch.rand((), generator=generator) < self.p)
