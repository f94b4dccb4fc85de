"""A full disk stops a run before a checkpoint is written, in one line, not halfway through one."""

from __future__ import annotations

import os
import zipfile

from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import checkpoint, dist, format_name_with_dist

from cdcd_composer.export import tensor_bytes
from cdcd_composer.storage import check_free_space

# A checkpoint holds the weights, AdamW's two moments and the EMA copy: four times the weights
# (more optimizer state or none changes this by a factor of at most two; the next check uses the
# size of the checkpoint actually written).
CHECKPOINT_COPIES = 4


class CheckpointSpace(Callback):
    """Checks the local save folder's free space at FIT_START and before each checkpoint.

    Runs before Composer's `CheckpointSaver` at the same event (the Trainer appends the saver
    last). The first checkpoint needs about `CHECKPOINT_COPIES` times the weights, each later
    one the size of the newest written. Too little space raises `StorageError` (one line) before
    anything is written. When a write fails anyway (the disk filled from elsewhere),
    `remove_partial` deletes the truncated file this run was writing.
    """

    def __init__(self) -> None:
        self.writing: str | None = None  # the file the saver writes at this event, when it saves

    def fit_start(self, state: State, logger: Logger) -> None:
        """Room for the first checkpoint, before the first batch."""
        saver = self.saver(state)
        if saver is not None and dist.get_global_rank() == 0:
            folder = self.folder(saver, state)
            check_free_space(folder, self.need(saver, state), f'save_folder {folder}')

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """Before the saver's own BATCH_CHECKPOINT."""
        self.before_save(state, Event.BATCH_CHECKPOINT)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        """Before the saver's own EPOCH_CHECKPOINT."""
        self.before_save(state, Event.EPOCH_CHECKPOINT)

    def before_save(self, state: State, event: Event) -> None:
        """When the saver will write at this event: records the file and checks the room for it."""
        saver = self.saver(state)
        self.writing = None
        if (
            saver is None
            or dist.get_global_rank() != 0
            or saver.last_checkpoint_batch == state.timestamp.batch
        ):
            return
        if not saver.save_interval(state, event):  # the saver's own rule: asked again, it answers the same
            return
        name = saver.filename.format(state, keep_placeholders=True)
        self.writing = checkpoint.get_save_filename(state, name)
        check_free_space(self.writing, self.need(saver, state), f'the checkpoint {self.writing}')

    def remove_partial(self) -> str | None:
        """Deletes the checkpoint file a failed save left incomplete; returns its path, if any."""
        path = self.writing
        if path is None or not path.endswith('.pt') or not os.path.isfile(path) or zipfile.is_zipfile(path):
            return None
        os.remove(path)
        return path

    @staticmethod
    def saver(state: State) -> CheckpointSaver | None:
        """Composer's checkpoint saver, when the run saves."""
        return next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)

    @staticmethod
    def folder(saver: CheckpointSaver, state: State) -> str:
        """The local folder the saver writes to (a temporary one for an object store)."""
        return format_name_with_dist(saver.folder, state.run_name)

    @staticmethod
    def need(saver: CheckpointSaver, state: State) -> int:
        """The next checkpoint's size: the newest one's, or the estimate before the first."""
        newest = saver.saved_checkpoints[-1] if saver.saved_checkpoints else None
        if newest is not None and os.path.isfile(newest):
            return os.path.getsize(newest)
        return CHECKPOINT_COPIES * tensor_bytes([*state.model.parameters(), *state.model.buffers()])
