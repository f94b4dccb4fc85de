"""Evaluates a trained model: validation CE against t, and samples next to real validation text.

The logic lives in `cdcd_composer.commands.evaluate`; `--help` lists the options.
"""

import sys

from cdcd_composer.commands.evaluate import main

if __name__ == '__main__':
    sys.exit(main())
