"""CDCD (continuous diffusion for categorical data) as a MosaicML Composer recipe.

The names most code needs, importable from the package (loaded on first use, so that importing
one submodule does not import them all):

    from cdcd_composer import CDCDDiffusion, load_trained_model, Request, SamplerSettings
"""

import importlib
from typing import Any

_EXPORTS = {
    'CDCDComposerModel': 'cdcd_composer.composer_model',
    'CDCDDiffusion': 'cdcd_composer.diffusion',
    'CDCDConfig': 'cdcd_composer.model',
    'CDCDTransformer': 'cdcd_composer.model',
    'TimeWarp': 'cdcd_composer.time_warping',
    'SamplerSettings': 'cdcd_composer.sampler',
    'sample': 'cdcd_composer.sampler',
    'MaskingConfig': 'cdcd_composer.masking',
    'Request': 'cdcd_composer.prompting',
    'RunSpec': 'cdcd_composer.run_spec',
    'TrainConfig': 'cdcd_composer.config',
    'load_trained_model': 'cdcd_composer.checkpoints.loading',
    'write_export': 'cdcd_composer.export',
    'load_export': 'cdcd_composer.export',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`cdcd_composer.NAME` for the names above, imported from their module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(_EXPORTS[name]), name)
