"""The Hugging Face model of an exported CDCD model: loading, checks and `generate`.

`python export.py ... --format hf` writes this module, with the package modules it imports
(`model`, `warp_curve`, `story_tokens`, `prompting`, `sampler`) pasted in before it, as the
folder's `modeling_cdcd.py` (`cdcd_composer.hf.standalone`). So the folder's code is the
package's code, and it imports only torch and transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from cdcd_composer.model import CDCDConfig, CDCDTransformer, DenoiserOutput
from cdcd_composer.prompting import Request
from cdcd_composer.sampler import (
    DISTILLED,
    SamplerSettings,
    check_sampling_request,
    decode_samples,
    distilled_timesteps,
    sample_in_batches,
    sampling_defaults,
)
from cdcd_composer.story_tokens import tokenizer_sha256
from cdcd_composer.warp_curve import WarpCurve

from .configuration_cdcd import HF_FORMAT, CDCDHFConfig

HF_WEIGHTS = 'model.safetensors'
HF_FILES = ('config.json', HF_WEIGHTS, 'tokenizer.json', 'configuration_cdcd.py', 'modeling_cdcd.py')
# safetensors metadata: the layout version and the SHA-256 of the tensors (`tensors_sha256`).
FORMAT_KEY, CHECKSUM_KEY = 'cdcd_hf_format', 'cdcd_tensors_sha256'
WEIGHTS_PREFIX = 'denoiser.'


class CDCDGeneration(NamedTuple):
    """What `CDCDModel.generate` returns: ids (N, L) int64, and texts cut at the end of each story."""

    ids: torch.Tensor
    texts: list[str]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def damaged(where: str, what: str) -> ValueError:
    """The one-line refusal of a damaged folder."""
    return ValueError(f'{where}: {what}; export the model again with python export.py MODEL OUT --format hf')


def check_folder(folder: str, config: CDCDHFConfig) -> None:
    """Refuses, in one line, a local export folder that lacks a file or whose weights do not fit.

    Raises:
        ValueError: a file is missing, the weights' header is unreadable or of another format,
            or their names and shapes differ from what `config` builds.
    """
    from safetensors import safe_open

    missing = [name for name in HF_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise damaged(folder, f'{", ".join(missing)} missing')
    try:
        with safe_open(os.path.join(folder, HF_WEIGHTS), framework='pt') as f:
            metadata, shapes = f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (no public class)
        raise damaged(folder, f'{HF_WEIGHTS} is no readable safetensors file ({str(e)[:100]})') from None
    if metadata.get(FORMAT_KEY, str(HF_FORMAT)) != str(HF_FORMAT):
        raise damaged(
            folder, f'{HF_WEIGHTS} is of format {metadata[FORMAT_KEY]}, this code reads {HF_FORMAT}'
        )
    with torch.device('meta'):
        expected = {WEIGHTS_PREFIX + k: tuple(v.shape) for k, v in denoiser_of(config).state_dict().items()}
    if shapes != expected:
        wrong = sorted(set(shapes) ^ set(expected)) or [k for k in expected if shapes[k] != expected[k]]
        raise damaged(folder, f'{HF_WEIGHTS} does not fit config.json (first mismatch: {wrong[0]})')


def check_config(where: str, config: CDCDHFConfig) -> None:
    """Refuses, in one line, a config.json value of the wrong type or outside the range sampling needs.

    Raises:
        ValueError: the first value that is wrong, named with what it must be.
    """

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    vocab = config.denoiser.get('vocab_size') if isinstance(config.denoiser, dict) else None
    seq_len = config.seq_len
    problems = [
        (not isinstance(config.hf_format, int) or config.hf_format != HF_FORMAT,
         f'hf_format {config.hf_format!r} is not {HF_FORMAT}, the format this code reads'),
        (not (number(config.t_min) and number(config.t_max) and 0 < config.t_min < config.t_max < math.inf),
         f't_min {config.t_min!r} and t_max {config.t_max!r} must satisfy 0 < t_min < t_max < inf'),
        (not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 2 <= seq_len <= 65536,
         f'seq_len {seq_len!r} must be an integer in [2, 65536]'),
        (isinstance(config.dataset, dict) and config.dataset.get('seq_len', seq_len) != seq_len,
         f'seq_len {seq_len!r} is not the seq_len of the data it was trained on'),
        (not isinstance(config.padded, bool), f'padded {config.padded!r} must be true or false'),
        (config.self_conditioning is not None and not (number(config.self_conditioning)
                                                       and 0 <= config.self_conditioning <= 1),
         f'self_conditioning {config.self_conditioning!r} must be null or a probability'),
        (config.weights not in ('ema', 'raw'), f'weights {config.weights!r} must be "ema" or "raw"'),
        (getattr(config, 'sampling', None) is not None and not isinstance(config.sampling, dict),
         f'sampling {getattr(config, "sampling", None)!r} must be null or an object'),
    ]  # fmt: skip
    masses = config.time_warp_masses
    if masses is not None:
        finite = isinstance(masses, list) and masses and all(number(m) and 0 <= m < math.inf for m in masses)
        problems.append(
            (not finite or abs(sum(masses) - 1.0) > 1e-6,
             'time_warp_masses must be finite, non-negative numbers that sum to 1')
        )  # fmt: skip
    for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
        value = getattr(config, name, None)
        inside = not isinstance(vocab, int) or (
            isinstance(value, int) and 0 <= value < vocab
        )  # no vocab: denoiser_of
        problems.append(
            (
                value is not None and not inside,
                f'{name} {value!r} must be an id of the {vocab}-token vocabulary',
            )
        )
    for wrong, message in problems:
        if wrong:
            raise damaged(where, f'config.json: {message}')


def denoiser_of(config: CDCDHFConfig) -> CDCDTransformer:
    """The denoiser `config` describes (random weights).

    Raises:
        ValueError: config.json's `denoiser` is not an architecture.
    """
    fields = {f.name for f in dataclasses.fields(CDCDConfig)}
    # `target_time` (a distilled student's) came later: a folder exported before it has none.
    if not isinstance(config.denoiser, dict) or set(config.denoiser) not in (
        fields,
        fields - {'target_time'},
    ):
        raise damaged(getattr(config, 'name_or_path', 'config'), 'config.json holds no denoiser architecture')
    return CDCDTransformer(CDCDConfig(**config.denoiser))


class CDCDModel(PreTrainedModel):
    """A CDCD denoiser with its time warp and sampler: `from_pretrained`, `forward`, `generate`.

    `forward` is one denoiser pass (`CDCDTransformer.forward`); `generate` integrates the
    probability-flow ODE from t_max to t_min over the time-warped steps and decodes the result.
    """

    config_class = CDCDHFConfig
    base_model_prefix = 'cdcd'
    _no_split_modules = ['Block']

    def __init__(self, config: CDCDHFConfig) -> None:
        super().__init__(config)
        self.denoiser = denoiser_of(config)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: the denoiser initialises itself, and `from_pretrained` loads every tensor."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args: Any, **kwargs: Any) -> CDCDModel:
        """`PreTrainedModel.from_pretrained`, refusing a damaged folder or non-finite weights in one line."""
        path = str(pretrained_model_name_or_path)
        config = kwargs.get('config')
        if not isinstance(config, PretrainedConfig):
            config = CDCDHFConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k != 'config'})
        check_config(path, config)
        if os.path.isdir(path):
            check_folder(path, config)
        model = super().from_pretrained(path, *args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            return model
        state = {WEIGHTS_PREFIX + k: v for k, v in model.denoiser.state_dict().items()}
        for name, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise damaged(path, f'{name} holds NaN or inf')
        if os.path.isdir(path):
            model._check_checksum(os.path.join(path, HF_WEIGHTS), state, path)
        model._check_recorded(state, path)
        return model

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`, recording the SHA-256 of the weights it saves.

        Fine-tuned weights so load again; the tokenizer's stays the one the model was trained with.
        """
        state = {
            WEIGHTS_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.denoiser.state_dict().items()
        }
        self.config.weights_sha256 = tensors_sha256(state)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _check_recorded(self, state: dict[str, torch.Tensor], where: str) -> None:
        """The weights and the tokenizer are the ones config.json records (format 2 records both).

        Raises:
            ValueError: another run's weights file, or another tokenizer, in one line.
        """
        config = self.config
        if config.weights_sha256 is not None and config.weights_sha256 != tensors_sha256(state):
            raise damaged(where, f"{HF_WEIGHTS} is not the weights config.json records (another run's?)")
        recorded = config.tokenizer_sha256
        if recorded is not None and recorded != tokenizer_sha256(self.tokenizer()):
            raise damaged(where, 'the tokenizer is not the one config.json records (swapped?)')

    @staticmethod
    def _check_checksum(weights: str, state: dict[str, torch.Tensor], where: str) -> None:
        """Compares the loaded tensors with the checksum in the weights' metadata (when it has one)."""
        from safetensors import safe_open

        with safe_open(weights, framework='pt') as f:
            recorded = (f.metadata() or {}).get(CHECKSUM_KEY)
        if recorded is not None and recorded != tensors_sha256(state):
            raise damaged(where, f'{HF_WEIGHTS} does not match its recorded checksum: a tensor was changed')

    def forward(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor,
        generate_mask: torch.Tensor | None = None,
        self_cond: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DenoiserOutput:
        """One denoiser pass; arguments as `CDCDTransformer.forward` (tokens (B, L), t (B,))."""
        return self.denoiser(tokens, t, generate_mask, self_cond, **kwargs)

    def time_warp(self) -> WarpCurve:
        """The fitted time warp (uniform when the export had none)."""
        masses = self.config.time_warp_masses
        masses = None if masses is None else torch.tensor(masses, dtype=torch.float64)
        return WarpCurve(self.config.t_min, self.config.t_max, masses=masses)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The training tokenizer, from the folder (or hub repository) the model came from."""
        if getattr(self, '_tokenizer', None) is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.config.name_or_path)
        return self._tokenizer

    @torch.no_grad()
    def generate(
        self,
        num_samples: int = 1,
        steps: int | None = None,
        prompt: str | None = None,
        seed: int = 0,
        *,
        template: str | None = None,
        blank_length: int = 8,
        solver: str | None = None,
        tau: float | None = None,
        guidance: float = 1.0,
        self_conditioning: bool | None = None,
        warp: bool = True,
        batch_size: int | None = None,
    ) -> CDCDGeneration:
        """Samples `num_samples` stories: the same ids as `generate.py` for the same settings and seed.

        Args:
            num_samples: How many.
            steps: Solver steps (default: the model's own; 24, or a distilled student's count).
            prompt: Text every sample continues.
            seed: Batch `i` (from sample `i`) draws its initial noise with seed + i.
            template: A story with `___` blanks of `blank_length` tokens to fill (instead of a prompt).
            blank_length: Tokens per blank.
            solver: 'euler', 'heun', 'exponential', 'dpmpp_2m' or 'distilled' (default: the model's own).
            tau: Score temperature (default: the model's own; 1, or the one a student was distilled at).
            guidance: Classifier-free guidance scale (1: none).
            self_conditioning: Feed x0_hat back (default: as the model was trained).
            warp: Timesteps from the fitted time warp (False: evenly spaced in t; not for a student).
            batch_size: Samples per solver batch (default: as many as fit in 2 GiB).
        """
        config, tokenizer = self.config, self.tokenizer()
        own_solver, own_tau, own_steps = sampling_defaults(config.sampling)
        steps = steps or own_steps
        check_sampling_request(num_samples, steps, seed, batch_size)
        if self_conditioning is None:
            self_conditioning = bool(config.self_conditioning)
        settings = SamplerSettings(
            solver=solver or own_solver, tau=own_tau if tau is None else tau,
            guidance=guidance, self_conditioning=self_conditioning,
        )  # fmt: skip
        given = Request(prompt, template, blank_length).given(
            tokenizer, config.seq_len, config.padded, num_samples
        )
        if settings.solver == DISTILLED:
            timesteps = distilled_timesteps(config.sampling, steps)
        else:
            timesteps = (
                self.time_warp() if warp else WarpCurve(config.t_min, config.t_max)
            ).sampling_timesteps(steps)
        self.denoiser.eval()
        ids = sample_in_batches(
            self.denoiser, timesteps, num_samples, config.seq_len, settings,
            given=given, seed=seed, batch_size=batch_size,
        )  # fmt: skip
        return CDCDGeneration(ids, decode_samples(ids, tokenizer, config.eos_token_id))
