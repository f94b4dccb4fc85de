"""The Callbacks `train.py` adds to an FSDP2 run (cdcd_composer/sharding.py has its settings).

Gradient reduction once per batch, and resuming a sharded run from a single-file checkpoint.
"""

from __future__ import annotations

import math

from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.fsdp import FSDPModule


class LoadSingleFileCheckpoint(Callback):
    """Lets an FSDP run with sharded checkpoints resume from a single-file one (a one-device run's).

    Composer chooses how to load from `state_dict_type`: 'sharded' reads a DCP folder only. For
    the load alone this callback switches it to 'full', under which every rank reads the whole
    file and keeps its own shards (`set_model_state_dict` and `set_optimizer_state_dict` with
    full state dicts); from then on the run saves sharded checkpoints again.
    """

    def before_load(self, state: State, logger: Logger) -> None:
        """Loads the next checkpoint as a full state dict."""
        state.fsdp_config.state_dict_type = 'full'

    def after_load(self, state: State, logger: Logger) -> None:
        """Saves sharded checkpoints again."""
        state.fsdp_config.state_dict_type = 'sharded'


class ReduceOnLastMicrobatch(Callback):
    """Under FSDP2, reduces gradients once per batch, after its last microbatch (as DDP's `no_sync`).

    Composer 0.32.1 runs every microbatch but the last of a DDP model inside `no_sync`, while an
    FSDP2 model reduce-scatters (and under HSDP also all-reduces) its gradients after every
    microbatch's backward: with 8 microbatches, 8 collectives per parameter group instead of 1.
    Before each training forward this tells FSDP2 whether that microbatch is the batch's last
    (`set_requires_gradient_sync`); the others accumulate unsharded gradients locally, which
    costs one unsharded gradient's memory per rank between the microbatches.

    With `reshard_after_forward: false` (parameters stay gathered from forward to backward) the
    parameters also stay gathered from one microbatch to the next (`set_reshard_after_backward`),
    so each unit all-gathers once per batch instead of once per microbatch, at the memory of one
    unsharded copy of the parameters during the batch; they are resharded after the last
    backward, before the optimizer step. On 2 CPU ranks in the launch-bound regime this cut
    cdcd-140m's batch from 0.75 s to 0.56 s (`python bench/train.py --overhead --set
    parallelism_config.fsdp.reshard_after_forward=false`).
    """

    def __init__(self) -> None:
        self.remaining = 0  # Microbatches of this batch still to run.

    def before_train_batch(self, state: State, logger: Logger) -> None:
        """Counts the batch's microbatches the way Composer splits it."""
        size = state.device_train_microbatch_size
        rows = len(next(iter(state.batch.values())))
        self.remaining = math.ceil(rows / size) if isinstance(size, int) and size > 0 else 1

    def before_forward(self, state: State, logger: Logger) -> None:
        """Only the last microbatch's backward reduces."""
        self.remaining -= 1
        last = self.remaining <= 0
        keep_unsharded = state.fsdp_config is not None and not state.fsdp_config.reshard_after_forward
        for module in state.model.modules():  # Composer shards the model's children, not the model.
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(last, recurse=False)
                if keep_unsharded:
                    module.set_reshard_after_backward(last, recurse=False)
