"""The sampling model: a trained run's denoiser, time warp and run spec, and its sampler.

`CDCDDiffusion` is a plain `nn.Module` that owns everything a trained run is: the denoiser's
weights, the time warp (plain tensors in its state dict), the moving averages where the run kept
them, and the run spec (its extra state). A checkpoint or an export is this model's state and
nothing else. It samples (`generate`), scores (`nll_bound`, `cross_entropy_at`) and counts its
FLOPs without Composer: `generate.py`, `eval.py` and `export.py` load it from an export without
importing Composer or Streaming. Training wraps it: `CDCDComposerModel` (composer_model.py) is
this model plus the forward process, the loss and the eval metrics, with the same state dict.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.likelihood import NLLBound, nll_bound
from cdcd_composer.model import AdaptiveLayerNorm, CDCDConfig, CDCDTransformer, TimeEmbedding
from cdcd_composer.prompting import Request
from cdcd_composer.run_spec import RunSpec
from cdcd_composer.sampler import (
    DISTILLED,
    SamplerSettings,
    check_sampling_request,
    decode_samples,
    sample_in_batches,
)
from cdcd_composer.time_warping import TimeWarp
from cdcd_composer.warp_curve import WarpCurve

if TYPE_CHECKING:
    from cdcd_composer.averaged_weights import AveragedWeights

# The paper's noise levels for validation CE (Fig. 2); those outside [t_min, t_max] are skipped.
EVAL_NOISE_LEVELS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
WARP_PREFIX = 'time_warp.'  # State-dict keys of the warp's tensors: time_warp.masses, ...
EMA_KEY = 'ema'  # The state-dict entry of the moving averages: {parameter name: averaged tensor}.


class CDCDDiffusion(nn.Module):
    """A trained CDCD model: the denoiser, its time warp and run spec, sampled by the ODE solvers.

    Args:
        model: Denoiser configuration (a `CDCDConfig` or its keyword dict).
        t_min: Smallest training noise std.
        t_max: Largest training noise std; sampling starts here.
        dataset: The training data's description; with `tokenizer`, what `generate` needs.
        tokenizer: The training tokenizer, as `tokenizer_to_json` writes it.
        self_conditioning: Training probability of self-conditioning, recorded so that sampling
            feeds x0_hat back by default (None: trained without it).
    """

    def __init__(
        self,
        model: CDCDConfig | dict[str, Any],
        t_min: float = 1.0,
        t_max: float = 300.0,
        dataset: DatasetMetadata | None = None,
        tokenizer: dict[str, Any] | None = None,
        self_conditioning: float | None = None,
    ) -> None:
        super().__init__()
        self.config = model if isinstance(model, CDCDConfig) else CDCDConfig(**model)
        self.spec = RunSpec(self.config, float(t_min), float(t_max), dataset, tokenizer, self_conditioning)
        self.model = CDCDTransformer(self.config)
        # A plain object, not a child module (FSDP wraps child modules): its tensors enter the
        # state dict through the hooks below. `TimeWarpRefit` replaces it with fitted curves.
        self.time_warp = TimeWarp(t_min, t_max)
        self.register_state_dict_post_hook(_save_time_warp)
        self.register_load_state_dict_pre_hook(_load_time_warp)
        # The moving averages of the weights, when the EMA algorithm keeps them: a plain object
        # like the warp, saved and restored with the weights under the state-dict key `ema`. The
        # attribute has the key's name: torch's distributed state dict resolves every key under a
        # DDP wrapper (`module.ema`) by attribute lookup.
        self.ema: AveragedWeights | None = None
        self.register_state_dict_post_hook(_save_averages)
        self.register_load_state_dict_pre_hook(_load_averages)
        # How long a loaded model trained ({'batch', 'sample', 'token'}), where its file said.
        self.trained: dict[str, int] | None = None

    @classmethod
    def from_spec(cls, spec: RunSpec, n_bins: int | None = None) -> CDCDDiffusion:
        """The model a run spec describes, with a uniform warp of `n_bins` bins (default 100)."""
        model = cls(
            spec.model, spec.t_min, spec.t_max, dataset=spec.dataset, tokenizer=spec.tokenizer,
            self_conditioning=spec.self_conditioning,
        )  # fmt: skip
        if n_bins is not None:
            model.time_warp = TimeWarp(spec.t_min, spec.t_max, n_bins)
        model.spec = dataclasses.replace(model.spec, sampling=spec.sampling)
        return model

    # -- state: the run spec rides along as extra state ---------------------------------------
    def get_extra_state(self) -> str:
        """The run spec as one JSON string."""
        return self.spec.to_json()

    def set_extra_state(self, state: Any) -> None:
        """Checks a checkpoint's spec against this run's, which stays (but for its `weights`).

        A resumed run must not inherit another architecture, tokenizer or canvas silently.

        Raises:
            ValueError: the checkpoint was trained with another model config, or on data with
                another tokenizer or sequence length.
        """
        loaded = RunSpec.from_json(state)
        differs = data_difference(loaded, self.spec)
        if differs:
            raise ValueError(
                f'the checkpoint was trained on data with {differs} than data.root has now; resume on the '
                'data it was trained on, or start afresh in another save_folder'
            )
        if loaded.model != self.config:
            raise ValueError(
                'the checkpoint was trained with a different model config; '
                'use the YAML it was trained with or set load_weights_only=true'
            )
        # Which weights it now holds, and how it samples (a distilled student's record).
        self.spec = dataclasses.replace(self.spec, weights=loaded.weights, sampling=loaded.sampling)

    # -- scoring ------------------------------------------------------------------------------
    def cross_entropy_at(
        self, tokens: torch.Tensor, t: float, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token CE (B, L) nats and logits (B, L, V) of clean tokens at one fixed noise level.

        Every position is generated (unconditional denoising): the entropy-vs-t curve of Fig. 2.

        Args:
            tokens: (B, L) clean ids.
            t: The noise std.
            noise: (B, L, d_embed) standard normal draws.
        """
        times = torch.full((tokens.shape[0],), float(t), device=tokens.device)
        # A distilled student's pass at t jumps to the end (its time of landing: t_min).
        landing = torch.full_like(times, self.spec.t_min) if self.config.target_time else None
        mask = torch.ones_like(tokens, dtype=torch.bool)
        zeros = torch.zeros(*tokens.shape, self.config.d_embed, device=tokens.device)
        out = self.model(tokens, times, mask, zeros, noise=noise, t_next=landing, cross_entropy=True)
        return out.cross_entropy, out.logits

    @torch.no_grad()
    def nll_bound(
        self, tokens: torch.Tensor, samples: int = 16, proposal: str = 'log_uniform', seed: int = 0
    ) -> NLLBound:
        """The variational bound on -log p of each sequence, in nats (`cdcd_composer.likelihood`).

        Every position is generated; with self-conditioning (when trained with it) each x0_hat
        comes from a second pass fed the first pass's estimate at the same x_t, so it stays a
        function of (x_t, t) and the bound stays valid.

        Args:
            tokens: (N, L) canvases.
            samples: Draws of t per sequence for the integral.
            proposal: 'log_uniform' (the lowest variance on the demo model), 'inverse_square' or 'warp'.
            seed: Seeds the noise and the draws of t.
        """
        if self.config.target_time:
            raise ValueError(
                "a distilled student's passes jump along its teacher's trajectories, so it has no likelihood "
                "bound; compute the teacher's"
            )
        dims = self.config.d_embed
        mask = torch.ones_like(tokens, dtype=torch.bool)
        zeros = torch.zeros(*tokens.shape, dims, device=tokens.device)

        def denoise(noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self_cond = zeros
            if self.spec.self_conditioned:
                self_cond = self.model(tokens, t, mask, zeros, noise=noise, expected_embedding=True).x0_hat
            out = self.model(tokens, t, mask, self_cond, noise=noise, embedding_error=True)
            return out.logits, out.embedding_error.sum(-1) * dims

        if self.config.embedding_norm == 'l2':  # every row has norm sqrt(d_embed)
            x0_squared = torch.full((len(tokens),), float(tokens.shape[1] * dims), device=tokens.device)
        else:
            x0_squared = self.model.embed(tokens).float().square().flatten(1).sum(-1)
        warp = self.time_warp
        return nll_bound(
            tokens, denoise, x0_squared, dims, self.spec.t_min, self.spec.t_max, samples=samples,
            proposal=proposal, generator=torch.Generator(device=tokens.device).manual_seed(seed),
            warp_inverse_cdf=warp.inverse_cdf, warp_density=warp.density,
        )  # fmt: skip

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(
        self,
        num_samples: int,
        steps: int | None = None,
        settings: SamplerSettings | None = None,
        *,
        request: Request | None = None,
        given: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        warp: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """(num_samples, seq_len) sampled token ids: the ODE solved over time-warped steps (`sampler`).

        Args:
            num_samples: How many sequences.
            steps: Solver steps (default: the model's, `RunSpec.default_steps`).
            settings: Solver, temperature, guidance; default: the model's (`sampling_settings`).
            request: A prompt or infilling template for every sample (default unconditional).
            given: Per-sample conditioning instead: (given_tokens, generate_mask), each (N, L).
            seed: Batch `i` (starting at sample `i`) draws its initial noise with seed + i.
            batch_size: Samples per solver batch (default: as many as fit `sampler.SAMPLING_MEMORY`).
            warp: Timesteps from the fitted time warp (False: evenly spaced in t).
            on_step: Called after each solver step of each batch (progress bars).
        """
        spec = self.spec
        steps = steps or spec.default_steps
        check_sampling_request(num_samples, steps, seed, batch_size)  # before the timesteps are allocated
        settings = settings or self.sampling_settings()
        if given is None:
            given = (request or Request()).given(
                spec.text_tokenizer, spec.data.seq_len, spec.padded, num_samples
            )
        if settings.solver == DISTILLED:
            timesteps = spec.distilled_timesteps(steps)
        else:
            timesteps = (self.time_warp if warp else WarpCurve(spec.t_min, spec.t_max)).sampling_timesteps(
                steps
            )
        return sample_in_batches(
            self.model, timesteps, num_samples, spec.data.seq_len, settings,
            given=given, seed=seed, batch_size=batch_size, on_step=on_step,
        )  # fmt: skip

    def sampling_settings(self, **changes: Any) -> SamplerSettings:
        """The model's own sampler settings (`RunSpec.sampling`, self-conditioning as trained), changed.

        A change given as None keeps the model's value.
        """
        spec = self.spec
        own = {'solver': spec.default_solver, 'tau': spec.default_tau,
               'self_conditioning': spec.self_conditioned}  # fmt: skip
        return SamplerSettings(**own | {k: v for k, v in changes.items() if v is not None})

    def generate(
        self,
        num_samples: int,
        steps: int | None = None,
        settings: SamplerSettings | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """`generate_tokens` decoded to text, each cut at its end-of-story token (same arguments)."""
        tokens = self.generate_tokens(num_samples, steps, settings, **kwargs)
        return decode_samples(tokens, self.spec.text_tokenizer, self.spec.data.eos_id)

    # -- cost -----------------------------------------------------------------------------------
    def forward_flops(self, batch_size: int, seq_len: int) -> int:
        """Matmul FLOPs of one denoiser forward pass over (batch_size, seq_len) tokens."""
        per_sequence = {id(p) for m in self.model.modules() if _is_per_sequence(m) for p in m.parameters()}
        per_token_params = sum(
            m.weight.numel()
            for m in self.model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in per_sequence
        )
        per_sequence_params = sum(
            m.weight.numel()
            for m in self.model.modules()
            if isinstance(m, nn.Linear) and id(m.weight) in per_sequence
        )
        rows, columns = self.model.alignment_padding()  # executed, but not the model's FLOPs
        per_token_params -= (rows + columns) * self.config.d_model
        tokens = batch_size * seq_len
        flops = 2 * per_token_params * tokens + 2 * per_sequence_params * batch_size
        flops += self.config.n_layers * 4 * seq_len * self.config.d_model * tokens  # QK^T and AV.
        if self.config.tie_output_head:
            flops += 2 * self.config.d_embed * self.config.vocab_size * tokens
        return flops


def _is_per_sequence(module: nn.Module) -> bool:
    """Modules applied once per sequence (time conditioning), not once per token."""
    return isinstance(module, (TimeEmbedding, AdaptiveLayerNorm))


def _save_time_warp(
    module: CDCDDiffusion, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict hook: the warp's fixed-shape tensors under `time_warp.*`."""
    for key, value in module.time_warp.state_dict().items():
        state_dict[prefix + WARP_PREFIX + key] = value


def _load_time_warp(module: CDCDDiffusion, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: takes the `time_warp.*` tensors out and into the model's warp.

    Raises:
        ValueError: the state has no warp: it is not a cdcd-composer model's.
    """
    keys = [key for key in list(state_dict) if key.startswith(prefix + WARP_PREFIX)]
    if not keys:
        raise ValueError(
            'the checkpoint holds no time warp in its model state: it is not a cdcd-composer checkpoint; '
            'pass one written by train.py, or start afresh'
        )
    warp = {key[len(prefix + WARP_PREFIX) :]: state_dict.pop(key) for key in keys}
    module.time_warp.load_state_dict({key: value.cpu() for key, value in warp.items()})


def _save_averages(
    module: CDCDDiffusion, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict hook: the averaged weights, as one `ema` entry {parameter name: tensor}."""
    if module.ema is not None:
        state_dict[prefix + EMA_KEY] = module.ema.state()


def _load_averages(module: CDCDDiffusion, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: restores the averages (a checkpoint without them: from its weights)."""
    averages = state_dict.pop(prefix + EMA_KEY, None)
    if module.ema is None:
        return  # Trained with EMA, resumed or loaded without it: the averages are not needed.
    if averages is not None:
        module.ema.load(averages)
        return
    params = module.ema.params
    module.ema.reset({name: state_dict.get(prefix + name, p) for name, p in params.items()})


def data_difference(checkpoint: RunSpec, run: RunSpec) -> str | None:
    """What of the data a checkpoint was trained on differs from this run's (None: the same).

    The tokenizer is compared by its model (vocabulary and merges), the canvas by its length and
    special ids; a dataset converted again with the same tokenizer and length is the same data.
    """
    if checkpoint.dataset is None or run.dataset is None:
        return None
    before, now = checkpoint.dataset, run.dataset
    if before.seq_len != now.seq_len:
        return f'another seq_len ({before.seq_len} tokens, not {now.seq_len})'
    ids = ('vocab_size', 'bos_id', 'eos_id', 'pad_id')
    if any(getattr(before, k) != getattr(now, k) for k in ids) or _tokenizer_model(
        checkpoint
    ) != _tokenizer_model(run):
        return 'another tokenizer'
    return None


def _tokenizer_model(spec: RunSpec) -> Any:
    """The tokenizer's model section (vocabulary, merges), or None without a tokenizer."""
    return None if spec.tokenizer is None else json.loads(spec.tokenizer['tokenizer']).get('model')
