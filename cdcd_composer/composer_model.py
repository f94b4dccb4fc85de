"""The ComposerModel: the forward process and loss, evaluation, FLOP counts, and generation.

It owns everything a trained run is: the denoiser's weights, the time warp (plain tensors in
its state dict) and the run spec (its extra state). A checkpoint or an export is this model's
state and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from composer.models import ComposerModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric, Metric

from cdcd_composer import sample_draws
from cdcd_composer.averaged_weights import EMA_KEY, AveragedWeights
from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.likelihood import NLLBound, nll_bound
from cdcd_composer.masking import MaskingConfig, sample_generate_mask
from cdcd_composer.model import AdaptiveLayerNorm, CDCDConfig, CDCDTransformer, DenoiserOutput, TimeEmbedding
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

# The paper's noise levels for validation CE (Fig. 2); those outside [t_min, t_max] are skipped.
EVAL_NOISE_LEVELS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
NLL_BOUND = 'NLL_bound'  # the eval metric of the likelihood bound, nats per non-pad token
# The per-row keys of a corrupted batch (a distillation's rows add the teacher's state, the
# landing time, the jump target and which rows land between states: `algorithms/distillation.py`).
ROW_KEYS = (
    'tokens',
    't',
    'generate_mask',
    'self_cond',
    'noise',
    'x_t',
    't_next',
    'jump_target',
    'lands_between_states',
)
WARP_PREFIX = 'time_warp.'  # State-dict keys of the warp's tensors: time_warp.masses, ...


def token_mean(key: str) -> MeanMetric:
    """A float64 mean of per-token values weighted by a mask, summed across ranks; `key` names it."""
    metric = MeanMetric(nan_strategy='error').set_dtype(torch.float64)
    metric.key = key  # The `eval_forward` output it averages (Composer deep-copies metrics).
    return metric


def _level_name(t: float) -> str:
    """'10' for 10.0, '0_1' for 0.1: usable in metric names and module keys."""
    return f'{t:g}'.replace('.', '_')


class CDCDComposerModel(ComposerModel):
    """CDCD trained by score interpolation: cross-entropy of the clean tokens given x_t = e + t * eps.

    Batch keys: `tokens` (B, L) int64, required. Optional keys let Algorithms take over parts of
    the corruption: `t` (B,), `noise` (B, L, d_embed), `generate_mask` (B, L) (1 = generate,
    default all ones) and `self_cond` (B, L, d_embed) (default zeros).

    Args:
        model: Denoiser configuration (a `CDCDConfig` or its keyword dict).
        t_min: Smallest training noise std.
        t_max: Largest training noise std; sampling starts here.
        eval_noise_levels: Noise stds at which validation CE and accuracy are reported.
        eval_seed: Seed of the evaluation noise, so every evaluation sees the same corruption.
        masking: Conditioning-mask mixture for training (None: every position generated).
        pad_id: Padding id of the dataset (padding is never given by a mask); taken from
            `dataset` when that is given.
        mse_weight: Weight of the auxiliary loss ||x0_hat - e||^2 / d_embed (mean over generated
            tokens) added to the CE; 0 (the paper) skips it entirely.
        dataset: The training data's description; with `tokenizer`, what `generate` needs.
        tokenizer: The training tokenizer, as `tokenizer_to_json` writes it.
        self_conditioning: Training probability of self-conditioning, recorded so that sampling
            feeds x0_hat back by default (None: trained without it).
        nll_bound_samples: Draws of t per sequence for the `NLL_bound` eval metric (0: no metric).
    """

    def __init__(
        self,
        model: CDCDConfig | dict[str, Any],
        t_min: float = 1.0,
        t_max: float = 300.0,
        eval_noise_levels: tuple[float, ...] = EVAL_NOISE_LEVELS,
        eval_seed: int = 1234,
        masking: MaskingConfig | dict[str, float] | None = None,
        pad_id: int = 0,
        mse_weight: float = 0.0,
        dataset: DatasetMetadata | None = None,
        tokenizer: dict[str, Any] | None = None,
        self_conditioning: float | None = None,
        nll_bound_samples: int = 4,
    ) -> None:
        super().__init__()
        if not 0 <= mse_weight < math.inf:  # NaN fails the comparison too
            raise ValueError(f'loss.mse_weight={mse_weight:g} must be >= 0 and finite')
        self.mse_weight = mse_weight
        self.masking = MaskingConfig(**masking) if isinstance(masking, dict) else masking
        self.pad_id = dataset.pad_id if dataset is not None else pad_id
        # Extra no-grad forward passes per training step, as a fraction of the batch; set by the
        # SelfConditioning algorithm so `flops_per_batch` counts them.
        self.extra_forward_fraction = 0.0
        # Weight of a distilled student's jump error (`Distillation` sets it; unused otherwise).
        self.jump_weight = 1.0
        self._forward_flops: dict[tuple[int, int], int] = {}  # (batch, length) -> forward_flops
        # (seed, epoch), set per batch by the `BatchNoiseSeed` callback: every sample's corruption
        # is then a function of (seed, epoch, its dataset index) alone (`sample_draws`).
        self.noise_seed: tuple[int, int] | None = None
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
        self.eval_noise_levels = tuple(float(t) for t in eval_noise_levels)
        self.eval_seed = eval_seed
        # A plain dict, not a ModuleDict: FSDP wraps every child module of a ComposerModel.
        self.eval_metrics: dict[str, MeanMetric] = {}
        for t in self.eval_noise_levels:
            for kind in ('CE', 'Accuracy'):
                key = f'{kind}_t{_level_name(t)}'
                self.eval_metrics[key] = token_mean(key)
        # A distilled student's passes jump along its teacher's trajectories: no likelihood bound.
        self.nll_bound_samples = 0 if self.config.target_time else nll_bound_samples
        if self.nll_bound_samples:
            self.eval_metrics[NLL_BOUND] = token_mean(NLL_BOUND)  # nats per non-pad token

    @classmethod
    def from_spec(cls, spec: RunSpec, n_bins: int | None = None) -> CDCDComposerModel:
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

    # -- the forward process and loss --------------------------------------------------------
    def begin_batch(self, seed: int, epoch: int) -> None:
        """Seeds the corruption draws of the coming batch (see `BatchNoiseSeed`)."""
        self.noise_seed = (seed, epoch)

    def draws(self, batch: dict[str, torch.Tensor]) -> sample_draws.SampleDraws | None:
        """The batch's per-sample random numbers, or None (the global RNG) without a seed or indices.

        Training batches carry each sample's dataset index (`StoryDataset`); with the seed and
        epoch of `begin_batch` they make every draw independent of ranks and microbatches.
        """
        if self.noise_seed is None or 'index' not in batch:
            return None
        return sample_draws.SampleDraws(*self.noise_seed, batch['index'])

    def corrupt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fills in t, noise, generate_mask and self_cond where the batch lacks them.

        Returns a new dict; the draws happen once, so an Algorithm may call this before the
        forward pass and run extra passes on exactly the same corruption.
        """
        tokens = batch['tokens']
        batch_size, length = tokens.shape
        out = dict(batch)
        draws = self.draws(batch)
        if 't' not in out:
            if draws is None:
                out['t'] = self.time_warp.sample_t(batch_size, tokens.device)
            else:
                out['t'] = self.time_warp.inverse_cdf(draws.uniform(sample_draws.T, 1)[:, 0])
        if 'noise' not in out and 'x_t' not in out:
            shape = (batch_size, length, self.config.d_embed)
            if draws is None:
                out['noise'] = torch.randn(*shape, device=tokens.device)
            else:
                out['noise'] = draws.normal(sample_draws.NOISE, length * self.config.d_embed).view(shape)
        if 'generate_mask' not in out:
            if self.masking is not None and self.training:
                uniform = draws.columns(sample_draws.MASK) if draws is not None else None
                out['generate_mask'] = sample_generate_mask(tokens, self.pad_id, self.masking, uniform)
            else:
                out['generate_mask'] = torch.ones_like(tokens, dtype=torch.bool)
        if 'self_cond' not in out:
            out['self_cond'] = torch.zeros(batch_size, length, self.config.d_embed, device=tokens.device)
        if self.config.target_time and 't_next' not in out:  # a student's jump to the end, from data
            out['t_next'] = torch.full_like(out['t'], self.spec.t_min)
        return out

    def denoise(self, batch: dict[str, torch.Tensor], **outputs: bool) -> DenoiserOutput:
        """The denoiser on a corrupted batch (see `corrupt`); `outputs` asks for x0_hat and the like."""
        return self.model(
            batch['tokens'],
            batch['t'],
            batch['generate_mask'],
            batch['self_cond'],
            noise=batch.get('noise'),
            x_t=batch.get('x_t'),
            t_next=batch.get('t_next'),
            **outputs,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward pass.

        Returns:
            `loss` (scalar, mean CE over generated tokens), `logits` (B, L, V),
            `ce_per_sequence` (B,) detached mean CE of each sequence's generated tokens, and
            `t` (B,) the noise level it was measured at: the (t, CE) pairs time warping fits;
            `given_share` (B,) the share of each sequence's positions given by the mask (a
            control variate for that fit);
            with `mse_weight` > 0 also `mse` (scalar, detached), the auxiliary term before weighting.
        """
        batch = self.corrupt(batch)
        jumps = 'jump_target' in batch  # a distillation's rows (`algorithms/distillation.py`)
        denoised = self.denoise(
            batch, embedding_error=bool(self.mse_weight), cross_entropy=True, expected_embedding=jumps
        )
        ce = denoised.cross_entropy
        m = batch['generate_mask'].to(ce.dtype)  # Given tokens carry no loss.
        # Each sequence's mean over its generated tokens, averaged over sequences: Composer weighs
        # a microbatch by its share of the device batch and DDP/FSDP average over ranks, so the
        # gradient is the mean over the global batch however it is split (docs/training.md).
        ce_per_sequence = (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        per_sequence = ce_per_sequence
        if jumps:  # a jump between the teacher's states: the error of the x0_hat that lands there
            error = (denoised.x0_hat - batch['jump_target']).square().mean(-1)
            jump = (error * m).sum(-1) / m.sum(-1).clamp_min(1.0)
            per_sequence = torch.where(
                batch['lands_between_states'], self.jump_weight * jump, ce_per_sequence
            )
        loss = per_sequence.mean()
        out = {
            'logits': denoised.logits,
            'ce_per_sequence': ce_per_sequence.detach(),
            't': batch['t'],
            'given_share': 1.0 - m.mean(-1),
        }
        if self.mse_weight:
            mse = ((denoised.embedding_error * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()
            loss = loss + self.mse_weight * mse
            out['mse'] = mse.detach()
        return {'loss': loss, **out}

    def loss(self, outputs: dict[str, torch.Tensor], batch: Any, *args, **kwargs) -> torch.Tensor:
        """The loss computed in `forward`."""
        return outputs['loss']

    # -- evaluation -----------------------------------------------------------------------------
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
        batch = {
            'tokens': tokens,
            't': torch.full((tokens.shape[0],), float(t), device=tokens.device),
            'noise': noise,
            'generate_mask': torch.ones_like(tokens, dtype=torch.bool),
        }
        denoised = self.denoise(self.corrupt(batch), cross_entropy=True)
        return denoised.cross_entropy, denoised.logits

    def eval_forward(
        self, batch: dict[str, torch.Tensor], outputs: Any | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-token CE and accuracy (B, L) at each fixed noise level, noise seeded by the batch content."""
        tokens = batch['tokens']
        generator = torch.Generator(device=tokens.device)
        generator.manual_seed(self.eval_seed + int(tokens.sum().item()))
        results = {}
        for t in self.eval_noise_levels:
            noise = torch.randn(*tokens.shape, self.config.d_embed, device=tokens.device, generator=generator)
            ce, logits = self.cross_entropy_at(tokens, t, noise)
            results[f'CE_t{_level_name(t)}'] = ce
            results[f'Accuracy_t{_level_name(t)}'] = (logits.argmax(-1) == tokens).float()
        if self.nll_bound_samples:
            bound = self.nll_bound(tokens, self.nll_bound_samples, seed=self.eval_seed + int(tokens.sum()))
            counted = (tokens != self.pad_id).sum(-1).clamp_min(1).double()
            results[NLL_BOUND] = bound.total / counted  # averaged with weights `counted`: nats per token
            results[f'{NLL_BOUND}_weight'] = counted
        return results

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        """Validation metrics: CE (nats/token) and token accuracy at each fixed noise level."""
        return {} if is_train else dict(self.eval_metrics)

    def update_metric(self, batch: Any, outputs: dict[str, torch.Tensor], metric: Metric) -> None:
        """Feeds the matching per-token values from `eval_forward` into its metric (and their weights)."""
        values = outputs[metric.key]
        metric.update(values, outputs.get(f'{metric.key}_weight', torch.ones_like(values)))

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

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        """Training FLOPs: 3 x forward (forward + backward) plus self-conditioning's no-grad passes.

        Read by Composer's SpeedMonitor.
        """
        shape = tuple(batch['tokens'].shape)
        if shape not in self._forward_flops:  # Walks every module: once per shape, not per batch.
            self._forward_flops[shape] = self.forward_flops(*shape)
        return int((3 + self.extra_forward_fraction) * self._forward_flops[shape])


def _is_per_sequence(module: nn.Module) -> bool:
    """Modules applied once per sequence (time conditioning), not once per token."""
    return isinstance(module, (TimeEmbedding, AdaptiveLayerNorm))


def unwrap_model(model: nn.Module) -> CDCDComposerModel:
    """The ComposerModel inside a DDP wrapper (FSDP shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]


def _save_time_warp(
    module: CDCDComposerModel, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict hook: the warp's fixed-shape tensors under `time_warp.*`."""
    for key, value in module.time_warp.state_dict().items():
        state_dict[prefix + WARP_PREFIX + key] = value


def _load_time_warp(module: CDCDComposerModel, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
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
    module: CDCDComposerModel, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict hook: the averaged weights, as one `ema` entry {parameter name: tensor}."""
    if module.ema is not None:
        state_dict[prefix + EMA_KEY] = module.ema.state()


def _load_averages(module: CDCDComposerModel, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
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
