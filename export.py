"""Exports a Composer checkpoint as a weights-only export (safetensors + JSON + tokenizer).

The logic lives in `cdcd_composer.commands.export`; `--help` lists the options.
"""

import sys

from cdcd_composer.commands.export import main

if __name__ == '__main__':
    sys.exit(main())
