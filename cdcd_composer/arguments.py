"""Argument types the command-line tools share: a bad count is refused by argparse, naming its flag.

`type=positive_int` makes `--steps 0` the one line `error: argument --steps: must be a positive
integer, got 0`, before anything loads.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: samples, steps, batch sizes, blank lengths)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value
