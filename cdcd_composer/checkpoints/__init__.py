"""Checkpoints: loading a trained model, where a run resumes from, reading pickles weights-only.

`loading` builds a model from an export or a Composer checkpoint; `resume` finds what a run
resumes from; `trust` is the weights-only unpickling every read goes through.
"""
