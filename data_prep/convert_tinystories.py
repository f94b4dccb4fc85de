"""Converts stories to MDS shards (train and val) with the tokenizer saved beside them.

The logic lives in `cdcd_composer.commands.convert`; `--help` lists the options.
"""

import sys

from cdcd_composer.commands.convert import main

if __name__ == '__main__':
    sys.exit(main())
