"""Composer callbacks of the recipe."""

from __future__ import annotations

from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger


class RunMetadata(Callback):
    """Carries what a checkpoint needs to be sampled from on its own: configs and the tokenizer.

    Its state is saved in every checkpoint (under `state.callbacks['RunMetadata']`) and
    restored on resume, so `generate.py CHECKPOINT` needs no YAML and no dataset.

    Args:
        metadata: JSON-safe dict with `model`, `diffusion`, `dataset` and `tokenizer` entries.
    """

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata

    def run_event(self, event: Any, state: State, logger: Logger) -> None:
        """Acts on no event: it only contributes state."""

    def state_dict(self) -> dict[str, Any]:
        """The metadata dict."""
        return {'metadata': self.metadata}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keeps this run's metadata: a resumed run must not inherit another tokenizer silently."""
        if 'metadata' in state and state['metadata'].get('model') != self.metadata.get('model'):
            raise ValueError(
                'the checkpoint was trained with a different model config; '
                'use the YAML it was trained with or set load_weights_only=true'
            )
