"""Exports a Composer checkpoint as a weights-only export (safetensors + JSON + tokenizer).

The logic lives in `cdcd_composer.commands.export`; `--help` lists the options. Its command
line (`cdcd_composer.arguments.export_parser`) is read before torch is imported:
a bad flag or `-h` answers at once.
"""

import sys

from cdcd_composer.arguments import export_parser

if __name__ == '__main__':
    export_parser().parse_args()  # -h and a refused flag stop here, before anything heavy is imported
    from cdcd_composer.commands.export import main

    sys.exit(main())
