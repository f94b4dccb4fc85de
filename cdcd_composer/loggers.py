"""Loggers: Composer's file logger and progress bar fixed for resumes, and the loggers' preflight.

- `AppendingFileLogger`: a resumed run appends to its log instead of erasing it.
- `ResumableProgressBar`: a checkpoint state of a fixed shape, which a sharded checkpoint
  needs to load at all.
- `check_loggers`: TensorBoard's folder, W&B's key or offline mode, MLflow's server, probed.
"""

from __future__ import annotations

import netrc
import os
import urllib.error
import urllib.request
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


PROBE_SECONDS = 5.0  # how long an MLflow server has to answer before the run refuses to start


def check_loggers(loggers: dict[str, dict[str, Any]]) -> None:
    """The enabled external loggers can log, checked before the Trainer is built.

    Args:
        loggers: `registry.enabled(cfg.loggers)`: name -> keyword arguments.

    Raises:
        ValueError: one line naming the logger setting and the fix.
    """
    log_dir = (loggers.get('tensorboard') or {}).get('log_dir')
    if log_dir is not None and os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ValueError(f'loggers.tensorboard.log_dir={log_dir} is a file; give a folder')
    if 'wandb' in loggers and not _wandb_can_log():
        raise ValueError(
            'loggers.wandb has no API key: run wandb login (or set WANDB_API_KEY), or log offline with '
            'WANDB_MODE=offline'
        )
    if 'mlflow' in loggers:
        uri = loggers['mlflow'].get('tracking_uri') or os.environ.get('MLFLOW_TRACKING_URI')
        if uri and uri.startswith(('http://', 'https://')):
            try:
                urllib.request.urlopen(uri, timeout=PROBE_SECONDS).close()
            except urllib.error.HTTPError:
                pass  # the server answered
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, 'reason', error)
                raise ValueError(
                    f'loggers.mlflow.tracking_uri={uri} did not answer in {PROBE_SECONDS:g} s ({reason}); '
                    'start the server or fix the URI'
                ) from None


def _wandb_can_log() -> bool:
    """W&B logs offline or disabled without a key; online it needs one (environment or ~/.netrc)."""
    if os.environ.get('WANDB_MODE', '').lower() in ('offline', 'disabled', 'dryrun') or os.environ.get(
        'WANDB_API_KEY'
    ):
        return True
    try:
        return netrc.netrc().authenticators('api.wandb.ai') is not None
    except (OSError, netrc.NetrcParseError):
        return False
