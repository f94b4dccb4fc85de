"""Evaluates a trained model: validation CE against t, and samples next to real validation text.

The logic lives in `cdcd_composer.commands.evaluate`; `--help` lists the options. Its command
line (`cdcd_composer.arguments.evaluate_parser`) is read before torch is imported:
a bad flag or `-h` answers at once.
"""

import sys

from cdcd_composer.arguments import evaluate_parser

if __name__ == '__main__':
    evaluate_parser().parse_args()  # -h and a refused flag stop here, before anything heavy is imported
    from cdcd_composer.commands.evaluate import main

    sys.exit(main())
