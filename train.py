"""Trains CDCD with Composer: `composer train.py yamls/cdcd-tiny.yaml key.sub=value ...`.

The logic lives in `cdcd_composer.commands.train`.
"""

import sys

from cdcd_composer.commands.train import cli

if __name__ == '__main__':
    cli(sys.argv[1:])
