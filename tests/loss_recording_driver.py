"""`python loss_recording_driver.py LOSS_FILE YAML [key=value ...]`: train.py plus a record of each
batch's exact training loss (one `batch hex-float` line per batch and rank, flushed at once, so
a killed run keeps what it did). `BATCH_SLEEP_SECONDS` slows each batch after batch
`BATCH_SLEEP_AFTER` down (not its numbers), so a test can kill the run while it still trains.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from composer.core import Callback  # noqa: E402
from composer.utils import dist  # noqa: E402

import train  # noqa: E402
from cdcd_composer.config import load_config  # noqa: E402


class LossFile(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) > int(os.environ.get('BATCH_SLEEP_AFTER', '0')):
            time.sleep(float(os.environ.get('BATCH_SLEEP_SECONDS', '0')))
        with open(self.path.format(rank=dist.get_global_rank()), 'a') as f:
            f.write(f'{int(state.timestamp.batch)} {float(state.loss).hex()}\n')


if __name__ == '__main__':
    trainer = train.main(load_config(sys.argv[2], sys.argv[3:]), return_trainer=True, do_train=False)
    trainer.state.callbacks.append(LossFile(sys.argv[1]))
    trainer.fit()
