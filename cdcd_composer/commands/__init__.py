"""The logic of the entry points: `train.py`, `generate.py`, `eval.py`, `export.py`, `data_prep/`."""
