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

    `fuse=True` (with `per='example'`) runs the no-grad passes of all of a batch's microbatches
    as one pass at BATCH_START: each microbatch is corrupted and its examples chosen exactly as
    above, in microbatch order, and one pass over the union of the chosen examples computes
    their estimates (the weights do not change within a batch). It draws the same corruption
    and chooses the same examples as the unfused form, so the training signal is the same; a
    batch of k microbatches then pays one pass's kernel launches instead of k, at the memory of
    a no-grad pass over p of the device batch (`python bench/train.py --overhead`).

    Both draws depend only on the seed and the position in training: identical after a resume,
    with no state to checkpoint, and the same forward calls and shapes on every rank (no
    per-rank coin that could hang FSDP).

    Args:
        p: Fraction of examples trained with self-conditioning (paper: 0.5).
        per: What one draw decides, `batch` or `example`.
        fuse: One no-grad pass per batch instead of one per microbatch (`per='example'` only).
    """

    def __init__(self, p: float = 0.5, per: str = 'example', fuse: bool = False) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f'algorithms.self_conditioning.p={p} must lie in [0, 1]')
        if per not in GRANULARITIES:
            raise ValueError(
                f'algorithms.self_conditioning.per={per!r} must be one of {", ".join(GRANULARITIES)}'
            )
        if fuse and per != 'example':
            raise ValueError('algorithms.self_conditioning.fuse=true needs per: example; set one of them')
        self.p, self.per, self.fuse = p, per, fuse
        self._microbatch = (-1, 0)  # (batch index, microbatch index within it)

    def match(self, event: Event, state: State) -> bool:
        """Runs at INIT (to register its FLOPs), then before every training forward (fused: BATCH_START)."""
        return event in (Event.INIT, Event.BATCH_START if self.fuse else Event.BEFORE_FORWARD)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Adds `self_cond` (and the corruption it was computed for) to `state.batch`."""
        model = unwrap_model(state.model)
        if event == Event.INIT:
            model.extra_forward_fraction = self.p
            return
        if event == Event.BATCH_START:
            state.batch = self._fused(model, state)
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
        chosen = self._choose(batch['tokens'].shape[0], self._example_generator(state))
        self_cond = torch.zeros_like(batch['self_cond'])
        self._estimate_chosen(model, batch, chosen, self_cond, state)
        return self_cond

    def _choose(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """`round(p * size)` of `size` examples, in batch order (so p=1 runs the batch as is), on the CPU."""
        return torch.randperm(size, generator=generator, device='cpu')[: round(self.p * size)].sort().values

    def _estimate_chosen(
        self, model, batch: dict, chosen: torch.Tensor, self_cond: torch.Tensor, state: State
    ) -> None:
        """Writes the estimates of the `chosen` examples of a corrupted batch into `self_cond` (B, L, d)."""
        chosen = chosen.to(batch['tokens'].device, non_blocking=True)  # without waiting for the device
        if len(chosen):
            subset = {
                key: batch[key][chosen] for key in ('tokens', 't', 'generate_mask', 'self_cond', 'noise')
            }
            self_cond[chosen] = self._estimate(model, subset, state)

    def _fused(self, model, state: State) -> dict[str, torch.Tensor]:
        """The device batch with every microbatch corrupted and its estimates from one pass.

        Microbatch i is the i-th chunk of `device_train_microbatch_size` examples, as Composer
        splits the batch; its draws and chosen examples are those `_estimate_on_subset` makes.
        """
        batch = state.device.batch_to_device(state.batch)
        size = state.device_train_microbatch_size or len(batch['tokens'])
        keys = list(batch)
        chunks = [
            model.corrupt(dict(zip(keys, parts))) for parts in zip(*(batch[k].split(size) for k in keys))
        ]
        batch_index, offset, picks = int(state.timestamp.batch), 0, []
        for i, chunk in enumerate(chunks):
            count = len(chunk['tokens'])
            picks.append(self._choose(count, self._generator(state, batch_index, i)) + offset)
            offset += count
        merged = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
        self._estimate_chosen(model, merged, torch.cat(picks), merged['self_cond'], state)
        return merged

    def _batch_heads(self, state: State) -> bool:
        """The batch's coin: the same on every rank and microbatch, and after a resume."""
        if self.p in (0.0, 1.0):
            return self.p == 1.0
        key = f'{state.rank_zero_seed}/{int(state.timestamp.batch)}'
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return bool(torch.rand((), generator=generator) < self.p)

    def _example_generator(self, state: State) -> torch.Generator:
        """The generator of this microbatch's chosen examples (microbatches counted per batch)."""
        batch_index = int(state.timestamp.batch)
        previous, count = self._microbatch
        self._microbatch = (batch_index, count + 1 if previous == batch_index else 0)
        return self._generator(state, batch_index, self._microbatch[1])

    @staticmethod
    def _generator(state: State, batch_index: int, microbatch: int) -> torch.Generator:
        """Seeded by (seed, rank, batch, microbatch): the same choice fused or not, and after a resume."""
        key = f'{state.rank_zero_seed}/{dist.get_global_rank()}/{batch_index}/{microbatch}'
        return torch.Generator().manual_seed(zlib.crc32(key.encode()))
