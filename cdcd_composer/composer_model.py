"""The Composer wrapper: noising, the score-interpolation loss, evaluation metrics and FLOP counts."""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric

from cdcd_composer.masking import MaskingConfig, sample_generate_mask
from cdcd_composer.model import AdaptiveLayerNorm, CDCDConfig, CDCDTransformer, TimeEmbedding
from cdcd_composer.time_warping import TimeWarp

EVAL_NOISE_LEVELS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


class MaskedMean(Metric):
    """Mean of a per-token quantity over generated positions, summed across ranks."""

    full_state_update = False

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key  # The `eval_forward` output it averages (metrics are deep-copied by Composer).
        self.add_state('total', default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx='sum')

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:  # type: ignore[override]
        """Adds a sum over tokens and the number of tokens it covers."""
        self.total += total.double()
        self.count += count.double()

    def compute(self) -> torch.Tensor:
        """The mean (NaN before any update)."""
        return self.total / self.count


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
        pad_id: Padding id of the dataset (padding is never given by a mask).
        mse_weight: Weight of the auxiliary loss ||x0_hat - e||^2 / d_embed (mean over generated
            tokens) added to the CE; 0 (the paper) skips it entirely.
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
    ) -> None:
        super().__init__()
        if mse_weight < 0:
            raise ValueError(f'loss.mse_weight={mse_weight} must be >= 0')
        self.mse_weight = mse_weight
        self.masking = MaskingConfig(**masking) if isinstance(masking, dict) else masking
        self.pad_id = pad_id
        # Extra no-grad forward passes per training step, as a fraction of the batch; set by the
        # SelfConditioning algorithm so `flops_per_batch` counts them.
        self.extra_forward_fraction = 0.0
        # Set per batch by the `BatchNoiseSeed` callback: the corruption of every microbatch is
        # then a function of (seed, rank, batch, draw), so a resumed run redraws it exactly.
        self.noise_seed: str | None = None
        self._draws = 0
        self.config = model if isinstance(model, CDCDConfig) else CDCDConfig(**model)
        self.model = CDCDTransformer(self.config)
        # Replaced by a fitted time warp when that callback is enabled; same interface.
        self.time_distribution = TimeWarp(t_min, t_max)
        self.eval_noise_levels = tuple(float(t) for t in eval_noise_levels)
        self.eval_seed = eval_seed
        # A plain dict, not a ModuleDict: FSDP wraps every child module of a ComposerModel.
        self.eval_metrics: dict[str, MaskedMean] = {}
        for t in self.eval_noise_levels:
            for kind in ('CE', 'Accuracy'):
                key = f'{kind}_t{_level_name(t)}'
                self.eval_metrics[key] = MaskedMean(key)

    # -- the forward process and loss --------------------------------------------------------
    def begin_batch(self, noise_seed: str) -> None:
        """Seeds the corruption draws of the coming batch (see `BatchNoiseSeed`)."""
        self.noise_seed, self._draws = noise_seed, 0

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """A generator for the next draw of this batch, or None (global RNG) when unseeded."""
        if self.noise_seed is None:
            return None
        self._draws += 1
        key = zlib.crc32(f'{self.noise_seed}/{self._draws}'.encode())
        return torch.Generator(device=device).manual_seed(key)

    def corrupt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fills in t, noise, generate_mask and self_cond where the batch lacks them.

        Returns a new dict; the draws happen once, so an Algorithm may call this before the
        forward pass and run extra passes on exactly the same corruption.
        """
        tokens = batch['tokens']
        batch_size, length = tokens.shape
        out = dict(batch)
        draws = 't' not in out or 'noise' not in out or 'generate_mask' not in out
        generator = self._generator(tokens.device) if draws else None
        if 't' not in out:
            out['t'] = self.time_distribution.sample_t(batch_size, tokens.device, generator)
        if 'noise' not in out:
            shape = (batch_size, length, self.config.d_embed)
            out['noise'] = torch.randn(*shape, device=tokens.device, generator=generator)
        if 'generate_mask' not in out:
            if self.masking is not None and self.training:
                out['generate_mask'] = sample_generate_mask(tokens, self.pad_id, self.masking, generator)
            else:
                out['generate_mask'] = torch.ones_like(tokens, dtype=torch.bool)
        if 'self_cond' not in out:
            out['self_cond'] = torch.zeros(batch_size, length, self.config.d_embed, device=tokens.device)
        return out

    def denoise(self, batch: dict[str, torch.Tensor], **kwargs: bool) -> Any:
        """Logits (B, L, V) for a corrupted batch (see `corrupt`); kwargs go to the denoiser."""
        return self.model(
            batch['tokens'],
            batch['t'],
            batch['generate_mask'],
            batch['self_cond'],
            noise=batch['noise'],
            **kwargs,
        )

    @staticmethod
    def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token CE in nats, float32. logits (B, L, V), tokens (B, L) -> (B, L)."""
        # Flattened to (B*L, V): the softmax runs over contiguous rows. The (B, V, L) layout that
        # `cross_entropy` expects for sequences made it 2.7x slower on CPU (bench/train.py).
        ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction='none')
        return ce.view(tokens.shape)

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
        if self.mse_weight:
            logits, embedding_error = self.denoise(batch, return_embedding_error=True)
        else:
            logits = self.denoise(batch)
        ce = self.token_cross_entropy(logits, batch['tokens'])
        m = batch['generate_mask'].to(ce.dtype)  # Given tokens carry no loss.
        loss = (ce * m).sum() / m.sum().clamp_min(1.0)
        ce_per_sequence = (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        out = {
            'logits': logits,
            'ce_per_sequence': ce_per_sequence.detach(),
            't': batch['t'],
            'given_share': 1.0 - m.mean(-1),
        }
        if self.mse_weight:
            mse = (embedding_error * m).sum() / m.sum().clamp_min(1.0)
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
        """CE and accuracy sums at each fixed noise level, with noise seeded by the batch content."""
        tokens = batch['tokens']
        generator = torch.Generator(device=tokens.device)
        generator.manual_seed(self.eval_seed + int(tokens.sum().item()))
        results = {}
        for t_value in self.eval_noise_levels:
            t = torch.full((tokens.shape[0],), t_value, device=tokens.device)
            noise = torch.randn(*tokens.shape, self.config.d_embed, device=tokens.device, generator=generator)
            # Validation measures unconditional denoising: every position generated.
            mask = torch.ones_like(tokens, dtype=torch.bool)
            corrupted = self.corrupt({**batch, 't': t, 'noise': noise, 'generate_mask': mask})
            logits = self.denoise(corrupted)
            m = corrupted['generate_mask'].float()
            name = _level_name(t_value)
            results[f'CE_t{name}'] = (self.token_cross_entropy(logits, tokens) * m).sum()
            results[f'Accuracy_t{name}'] = ((logits.argmax(-1) == tokens).float() * m).sum()
            results['count'] = m.sum()
        return results

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        """Validation metrics: CE (nats/token) and token accuracy at each fixed noise level."""
        return {} if is_train else dict(self.eval_metrics)

    def update_metric(self, batch: Any, outputs: dict[str, torch.Tensor], metric: Metric) -> None:
        """Feeds the matching sum from `eval_forward` into its metric."""
        metric.update(outputs[metric.key], outputs['count'])

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
        batch_size, seq_len = batch['tokens'].shape
        return int((3 + self.extra_forward_fraction) * self.forward_flops(batch_size, seq_len))


def _is_per_sequence(module: nn.Module) -> bool:
    """Modules applied once per sequence (time conditioning), not once per token."""
    return isinstance(module, (TimeEmbedding, AdaptiveLayerNorm))


def unwrap_model(model: nn.Module) -> CDCDComposerModel:
    """The ComposerModel inside a DDP wrapper (FSDP shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model  # type: ignore[return-value]
