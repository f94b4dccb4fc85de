"""`python loss_recording_driver.py LOSS_FILE YAML [key=value ...]`: train.py plus a record of each
batch's exact training loss (one `batch hex-float` line per batch and rank, flushed at once, so
a killed run keeps what it did). `BATCH_SLEEP_SECONDS` slows each batch down (not its numbers),
so that an outage test overlaps the checkpoint uploads.

To be killed at a known point, whatever the machine's load: with `PAUSE_AT_BATCH=B`,
`PAUSE_POINTER=s3://bucket/key` and `PAUSE_MARKER=path-{rank}`, every rank stops at the end of
batch B, keeps Composer's checkpoint uploads going until the pointer object names the checkpoint
of `PAUSE_POINTER_NAMES` (e.g. `ba10`), then writes its marker and blocks until it is killed.
Without `PAUSE_POINTER` (checkpoints in a local folder, written before the event ends), every
rank stops once the checkpoint of batch B is saved. A resumed run starts after batch B and
never stops, so the very same command both dies and resumes.
"""

import os
import signal
import sys
import time

from composer.callbacks import CheckpointSaver  # noqa: E402
from composer.core import Callback  # noqa: E402
from composer.utils import dist  # noqa: E402

from cdcd_composer.commands import train  # noqa: E402
from cdcd_composer.config import load_config  # noqa: E402


class LossFile(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def batch_end(self, state, logger) -> None:
        time.sleep(float(os.environ.get('BATCH_SLEEP_SECONDS', '0')))
        with open(self.path.format(rank=dist.get_global_rank()), 'a') as f:
            f.write(f'{int(state.timestamp.batch)} {float(state.loss).hex()}\n')


def pointer_names(uri: str, name: str) -> bool:
    """Whether the object at `uri` exists and its text contains `name`."""
    import boto3

    bucket, key = uri.removeprefix('s3://').split('/', 1)
    s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL'])
    try:
        return name in s3.get_object(Bucket=bucket, Key=key)['Body'].read().decode()
    except s3.exceptions.NoSuchKey:
        return False


class PauseForKill(Callback):
    """Holds the run at batch `batch` once its checkpoint is saved (and the pointer names it)."""

    def __init__(self, batch: int, marker: str, pointer: str | None = None, names: str = '') -> None:
        self.batch, self.pointer, self.names, self.marker = batch, pointer, names, marker

    def batch_end(self, state, logger) -> None:
        if self.pointer is None or int(state.timestamp.batch) != self.batch:
            return
        savers = [c for c in state.callbacks if isinstance(c, CheckpointSaver)]
        while not pointer_names(self.pointer, self.names):
            for saver in savers:  # Its batch_end starts the pointer upload once the checkpoint is up.
                saver.batch_end(state, logger)
            time.sleep(0.05)
        self.pause()

    def batch_checkpoint(self, state, logger) -> None:
        # Appended after Composer's CheckpointSaver, so this runs once the local save returned.
        if self.pointer is None and int(state.timestamp.batch) == self.batch:
            self.pause()

    def pause(self) -> None:
        with open(self.marker.format(rank=dist.get_global_rank()), 'w') as f:
            f.write('paused\n')
        signal.pause()  # until the test's SIGKILL


if __name__ == '__main__':
    trainer = train.main(load_config(sys.argv[2], sys.argv[3:]), return_trainer=True, do_train=False)
    trainer.state.callbacks.append(LossFile(sys.argv[1]))
    if 'PAUSE_AT_BATCH' in os.environ:
        trainer.state.callbacks.append(
            PauseForKill(
                int(os.environ['PAUSE_AT_BATCH']),
                os.environ['PAUSE_MARKER'],
                os.environ.get('PAUSE_POINTER'),
                os.environ.get('PAUSE_POINTER_NAMES', ''),
            )
        )
    trainer.fit()
