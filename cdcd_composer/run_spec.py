"""The run spec: everything besides tensors that a trained model needs to be sampled or resumed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.data.tokenization import tokenizer_from_json
from cdcd_composer.model import CDCDConfig
from cdcd_composer.sampler import distilled_timesteps, sampling_defaults

SPEC_FORMAT = 2  # bumped when the spec's fields change; a reader accepts its own only


@dataclass(frozen=True)
class RunSpec:
    """Architecture, noise range, data layout, tokenizer and self-conditioning of a run.

    It travels inside the model's state dict (`CDCDComposerModel.get_extra_state`), so a
    checkpoint or an export is the model's state and nothing else.

    Attributes:
        model: The denoiser's architecture.
        t_min: Smallest noise std (sampling ends here).
        t_max: Largest noise std (sampling starts here).
        dataset: The training data's description (canvas length, ids, layout, source); None for
            a model built without data (tests, benchmarks), which cannot turn samples into text.
        tokenizer: The tokenizer as `tokenizer_to_json` wrote it (None without data).
        self_conditioning: Training probability of self-conditioning (None: trained without it).
        weights: Which weights the state holds: 'raw' (as the optimizer left them) or 'ema'
            (their exponential moving average); an export records its choice here.
        sampling: How the model samples when nothing else is asked, where that belongs to the
            model: a distilled student's {'solver': 'distilled', 'tau', 'steps' (its default
            count), 'timesteps' (count -> its pass times and t_min)}. None: the library's defaults.
    """

    model: CDCDConfig
    t_min: float = 1.0
    t_max: float = 300.0
    dataset: DatasetMetadata | None = None
    tokenizer: dict[str, Any] | None = None
    self_conditioning: float | None = None
    weights: str = 'raw'
    sampling: dict[str, Any] | None = None

    @cached_property
    def text_tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer object (built once).

        Raises:
            ValueError: the spec has no tokenizer (a model built without data).
        """
        if self.tokenizer is None:
            raise ValueError(
                'this model was built without a dataset, so it has no tokenizer to write text with'
            )
        return tokenizer_from_json(self.tokenizer)

    @property
    def data(self) -> DatasetMetadata:
        """The dataset description; raises ValueError for a model built without data."""
        if self.dataset is None:
            raise ValueError('this model was built without a dataset: its canvas length and ids are unknown')
        return self.dataset

    @property
    def padded(self) -> bool:
        """One story per canvas, padded (False: stories packed into full windows)."""
        return self.data.layout == 'padded'

    @property
    def default_solver(self) -> str:
        """The solver it samples with by default."""
        return sampling_defaults(self.sampling)[0]

    @property
    def default_tau(self) -> float:
        """The score temperature it samples at by default (a student: the one it was distilled at)."""
        return sampling_defaults(self.sampling)[1]

    @property
    def default_steps(self) -> int:
        """The solver steps it samples with by default (a distilled student: network evaluations)."""
        return sampling_defaults(self.sampling)[2]

    def distilled_timesteps(self, steps: int) -> torch.Tensor:
        """A distilled student's pass times for `steps` evaluations (`sampler.distilled_timesteps`)."""
        return distilled_timesteps(self.sampling, steps)

    @property
    def self_conditioned(self) -> bool:
        """Trained with self-conditioning: sampling should feed x0_hat back."""
        return bool(self.self_conditioning)

    def to_json(self) -> str:
        """One JSON string (a fixed-type value, as sharded checkpoints need)."""
        blob = dataclasses.asdict(self)
        blob['dataset'] = None if self.dataset is None else self.dataset.to_json()
        return json.dumps({'format': SPEC_FORMAT, **blob}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Inverse of `to_json`.

        Raises:
            ValueError: not a run spec of this version.
        """
        blob = json.loads(text)
        if not isinstance(blob, dict) or blob.pop('format', None) != SPEC_FORMAT:
            raise ValueError('not a cdcd-composer run spec of this version')
        dataset = blob.pop('dataset')
        return cls(
            model=CDCDConfig(**blob.pop('model')),
            dataset=None if dataset is None else DatasetMetadata.from_json(dataset),
            **blob,
        )
