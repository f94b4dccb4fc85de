"""Trains CDCD with Composer: `composer train.py yamls/cdcd-tiny.yaml key.sub=value ...`.

The logic lives in `cdcd_composer.commands.train`.
"""

import sys

from cdcd_composer.arguments import answer_train_usage

if __name__ == '__main__':
    answer_train_usage(sys.argv[1:])  # -h and a missing YAML answer here, before torch is imported
    from cdcd_composer.commands.train import cli

    cli(sys.argv[1:])
