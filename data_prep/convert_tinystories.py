"""Converts stories to MDS shards (train and val) with the tokenizer saved beside them.

The logic lives in `cdcd_composer.commands.convert`; `--help` lists the options. Its command
line (`cdcd_composer.arguments.convert_parser`) is read before torch is imported.
"""

import sys

from cdcd_composer.arguments import convert_parser

if __name__ == '__main__':
    convert_parser().parse_args()  # -h and a refused flag stop here, before anything heavy is imported
    from cdcd_composer.commands.convert import main

    sys.exit(main())
