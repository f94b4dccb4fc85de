"""Loading a trained denoiser, its tokenizer and its noise range from a Composer checkpoint."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from cdcd_composer.model import CDCDConfig, CDCDTransformer
from cdcd_composer.time_warping import TimeWarp
from cdcd_composer.tokenization import tokenizer_from_json


@dataclass
class TrainedModel:
    """Everything sampling needs."""

    model: CDCDTransformer
    tokenizer: PreTrainedTokenizerFast
    time_distribution: TimeWarp
    seq_len: int
    bos_id: int
    eos_id: int
    source: str  # Dataset source ('synthetic' means the grammar recogniser applies).
    self_conditioned: bool  # Trained with self-conditioning: sampling should feed x0_hat back.


def _local_copy(path: str, workdir: str) -> str:
    if '://' not in path:
        if not os.path.isfile(path):
            raise ValueError(f'checkpoint {path!r} not found; pass a .pt file written by train.py')
        return path
    from composer.utils import get_file

    local = os.path.join(workdir, os.path.basename(path))
    get_file(path, local, progress_bar=False)
    return local


def load_trained_model(path: str, device: str = 'cpu', warp: bool = True) -> TrainedModel:
    """Builds the denoiser from a full (monolithic) Composer checkpoint written by `train.py`.

    The checkpoint is unpickled (`torch.load(weights_only=False)`, as Composer does): only
    load checkpoints you trust.

    Args:
        path: Local path or object-store URI of a `.pt` checkpoint.
        device: Where to put the model.
        warp: Use the fitted time warp stored in the checkpoint (False: uniform t, for comparison).

    Raises:
        ValueError: the file is missing or was not written by this recipe's `train.py`.
    """
    with tempfile.TemporaryDirectory() as workdir:
        state: dict[str, Any] = torch.load(_local_copy(path, workdir), map_location='cpu', weights_only=False)
    try:
        meta = state['state']['callbacks']['RunMetadata']['metadata']
        weights = state['state']['model']
    except (KeyError, TypeError):
        raise ValueError(
            f'{path!r} is not a cdcd-composer checkpoint (no RunMetadata); use one from train.py'
        ) from None
    model = CDCDTransformer(CDCDConfig(**meta['model']))
    prefix = 'model.'
    model.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    model.to(device).eval()
    dataset = meta['dataset']
    time_distribution = TimeWarp(meta['diffusion']['t_min'], meta['diffusion']['t_max'])
    refit_state = state['state']['callbacks'].get('TimeWarpRefit')
    if warp and refit_state is not None and refit_state['warp'] is not None:
        time_distribution = TimeWarp(
            time_distribution.t_min, time_distribution.t_max, **refit_state['warp_kwargs']
        )
        time_distribution.load_state_dict(refit_state['warp'])
    return TrainedModel(
        model=model,
        tokenizer=tokenizer_from_json(meta['tokenizer']),
        time_distribution=time_distribution,
        seq_len=dataset['seq_len'],
        bos_id=dataset['bos_id'],
        eos_id=dataset['eos_id'],
        source=dataset['source'],
        self_conditioned=bool(meta.get('self_conditioning')),
    )
