"""Samples stories from a trained model.

The logic lives in `cdcd_composer.commands.generate`; `--help` lists the options. Its command
line (`cdcd_composer.arguments.generate_parser`) is read before torch is imported:
a bad flag or `-h` answers at once.
"""

import sys

from cdcd_composer.arguments import generate_parser

if __name__ == '__main__':
    generate_parser().parse_args()  # -h and a refused flag stop here, before anything heavy is imported
    from cdcd_composer.commands.generate import main

    sys.exit(main())
