"""An exponential moving average of the weights, held like the parameters (DTensors under FSDP2).

Composer 0.32.1's own `EMA` cannot serve the FSDP2 recipes: it copies the parameters at `INIT`,
before FSDP2 turns them into DTensors, so its swap at `EVAL_END` fails (`got mixed torch.Tensor
and DTensor`); its algorithm state sits in a list that distributed checkpointing pickles whole
on one rank, so a sharded checkpoint could not keep the other ranks' shards; and it swaps the
averages into the model at every checkpoint, so a checkpoint's "model" is not what is trained.

Here the averages are a clone of each parameter taken after FSDP2 has sharded the model (the
same placement, so every rank averages only its own shard) and held by the model (`diffusion.CDCDDiffusion`),
whose state dict carries them under the key `ema` (a dict by parameter name). A checkpoint,
sharded or full, therefore holds them with the model's weights and restores them on resume;
the export chooses between them and the raw weights (`cdcd_composer.export.select_weights`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

log = logging.getLogger(__name__)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an alias: writing to it writes the DTensor), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_like(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` laid out like `target`: a full tensor is cut into target's shard on this rank."""
    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        # Every rank holds the full tensor (a full checkpoint): take this rank's part, no collective.
        source = distribute_tensor(
            source.to(target.device), target.device_mesh, target.placements, src_data_rank=None
        )
    return _local(source)


class AveragedWeights:
    """The moving averages of a model's trainable parameters, one per parameter, shard for shard.

    Args:
        model: The ComposerModel after FSDP wrapping (before any DDP wrapper). Its parameter
            objects are kept: FSDP2's sharded parameters and plain ones stay the same objects
            for the whole run (the optimizer updates them in place), whatever is registered
            on the modules during a forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.averages = {name: p.detach().clone() for name, p in self.params.items()}
        self.active = False  # True while the averages are swapped into the model.

    @torch.no_grad()
    def update(self, smoothing: float) -> None:
        """Moves each average towards its weight: `a <- s * a + (1 - s) * w`, one fused op for all."""
        if self.active:
            raise RuntimeError('the averaged weights are swapped in; swap them out before an update')
        names = list(self.params)
        averages = [_local(self.averages[n]) for n in names]
        torch._foreach_lerp_(averages, [_local(self.params[n]) for n in names], 1.0 - smoothing)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the model's weights and the averages, in place (FSDP2's storage stays its own)."""
        # A module that stayed unsharded after a no-grad forward (FSDP2's root, or
        # reshard_after_forward=false) would not gather again and would run on stale weights.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        names = list(self.params)
        weights = [_local(self.params[n]) for n in names]
        averages = [_local(self.averages[n]) for n in names]
        scratch = torch._foreach_mul(weights, 1.0)
        torch._foreach_copy_(weights, averages)
        torch._foreach_copy_(averages, scratch)
        self.active = not self.active

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averages in the model for the duration (sampling, a look at the EMA model)."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (DTensors under FSDP2: checkpointed shard for shard)."""
        if self.active:
            raise RuntimeError('the averaged weights are swapped in; a checkpoint now would mix them')
        return dict(self.averages)

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Restores the averages from a checkpoint (full tensors or shards of the same layout).

        Raises:
            ValueError: the checkpoint averages other parameters than this model has.
        """
        if set(state) != set(self.averages):
            missing = sorted(set(self.averages) - set(state)) or sorted(set(state) - set(self.averages))
            raise ValueError(
                f'the checkpoint averages other parameters than this model (first: {missing[0]}); '
                'resume with the YAML it was trained with'
            )
        for name, target in self.averages.items():
            if state[name] is not target:
                _local(target).copy_(_shard_like(state[name], target))

    @torch.no_grad()
    def reset(self, weights: dict[str, torch.Tensor]) -> None:
        """Starts the averages at the given weights (a checkpoint that had none)."""
        for name, target in self.averages.items():
            _local(target).copy_(_shard_like(weights[name], target))
