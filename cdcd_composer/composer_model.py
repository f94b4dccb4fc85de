"""The ComposerModel: the sampling model (`diffusion.CDCDDiffusion`) trained through Composer.

It adds the forward process and the loss, the evaluation metrics and the FLOP count Composer
reads; its state dict is the sampling model's, so a checkpoint loads as either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from composer.models import ComposerModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric, Metric

from cdcd_composer import sample_draws
from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.diffusion import EVAL_NOISE_LEVELS, CDCDDiffusion
from cdcd_composer.masking import MaskingConfig, sample_generate_mask
from cdcd_composer.model import CDCDConfig, DenoiserOutput

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


def token_mean(key: str) -> MeanMetric:
    """A float64 mean of per-token values weighted by a mask, summed across ranks; `key` names it."""
    metric = MeanMetric(nan_strategy='error').set_dtype(torch.float64)
    metric.key = key  # The `eval_forward` output it averages (Composer deep-copies metrics).
    return metric


def _level_name(t: float) -> str:
    """'10' for 10.0, '0_1' for 0.1: usable in metric names and module keys."""
    return f'{t:g}'.replace('.', '_')


class CDCDComposerModel(CDCDDiffusion, ComposerModel):
    """CDCD trained by score interpolation: cross-entropy of the clean tokens given x_t = e + t * eps.

    The sampling model (`CDCDDiffusion`: denoiser, warp, run spec, `generate`) with the forward
    process, the loss and the eval metrics; its state dict is the sampling model's.

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
        if not 0 <= mse_weight < math.inf:  # NaN fails the comparison too
            raise ValueError(f'loss.mse_weight={mse_weight:g} must be >= 0 and finite')
        super().__init__(model, t_min, t_max, dataset, tokenizer, self_conditioning)
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

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        """Training FLOPs: 3 x forward (forward + backward) plus self-conditioning's no-grad passes.

        Read by Composer's SpeedMonitor.
        """
        shape = tuple(batch['tokens'].shape)
        if shape not in self._forward_flops:  # Walks every module: once per shape, not per batch.
            self._forward_flops[shape] = self.forward_flops(*shape)
        return int((3 + self.extra_forward_fraction) * self._forward_flops[shape])


def unwrap_model(model: nn.Module) -> CDCDComposerModel:
    """The ComposerModel inside a DDP wrapper (FSDP shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]
