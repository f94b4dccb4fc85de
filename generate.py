"""Samples stories from a trained model.

The logic lives in `cdcd_composer.commands.generate`; `--help` lists the options.
"""

import sys

from cdcd_composer.commands.generate import main

if __name__ == '__main__':
    sys.exit(main())
