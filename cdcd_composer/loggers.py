"""Composer's file logger and progress bar, fixed so that a run killed and resumed keeps both.

- `AppendingFileLogger`: a resumed run appends to its log instead of erasing it.
- `ResumableProgressBar`: a checkpoint state of a fixed shape, which a sharded checkpoint
  needs to load at all.
"""

from __future__ import annotations

import os
from typing import Any

from composer.core import State
from composer.loggers import FileLogger, Logger, ProgressBarLogger

from cdcd_composer import workarounds


class AppendingFileLogger(FileLogger):
    """`loggers.file`: Composer's `FileLogger`, appending to an existing log unless `overwrite=true`.

    Composer 0.32.1 stores its `overwrite` argument as a one-element tuple
    (`self.overwrite = overwrite,`), which is always true, so every run truncates its log: the
    run that autoresume continues after a kill erased the log of everything before the kill.
    Here `overwrite=false` (the default) appends, so one file holds the whole run, each start
    marked by Composer's config header; `overwrite=true` starts the file afresh.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        workarounds.require('AppendingFileLogger')
        super().__init__(*args, **kwargs)

    def init(self, state: State, logger: Logger) -> None:
        """Opens the log for appending (or truncates it with `overwrite=true`) and flushes the queue."""
        del logger  # unused, as in Composer's
        overwrite = self.overwrite[0] if isinstance(self.overwrite, tuple) else self.overwrite
        self._is_newline = True
        self._run_name = state.run_name
        if self.file is not None:
            raise RuntimeError('The file logger is already initialized')
        folder = os.path.dirname(self.filename)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.file = open(self.filename, 'w+' if overwrite else 'a+', buffering=self.buffer_size)
        self._flush_queue()


class ResumableProgressBar(ProgressBarLogger):
    """Composer's progress bar, without checkpoint state.

    Composer's saves its bars' settings when they exist and `None` when they do not (always
    at load time, before training starts). A sharded checkpoint holds the keys of the save,
    the loading run asks for the keys of its own (empty) state, and distributed checkpointing
    then fails with `Missing key in checkpoint state_dict: state.callbacks.ProgressBarLogger.
    train_pbar`: a one-process FSDP2 run (cdcd-140m on one GPU) could not resume. The bars
    are rebuilt from the run's timestamp anyway, so there is nothing to keep.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        workarounds.require('ResumableProgressBar')
        super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The same keys at every save and load, holding nothing."""
        return {'train_pbar': None, 'eval_pbar': None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the bars start from the resumed timestamp."""
