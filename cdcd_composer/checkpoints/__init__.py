"""Checkpoints: loading a trained model, resuming a run, and reading pickles weights-only."""
