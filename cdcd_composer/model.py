"""The CDCD denoiser: a time-conditioned bidirectional transformer over noisy token embeddings."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PRECONDITIONINGS = ('cdcd', 'edm', 'tanh')
# GEMM dimensions aligned for tensor-core kernels: the vocabulary (the head's output width) to a
# multiple of 64, the denoiser's input width (3 d_embed + 1) to a multiple of 16.
VOCAB_MULTIPLE, INPUT_MULTIPLE = 64, 16
# Rows per chunk of the eager cross-entropy: an fp32 chunk of about 2**26 logits (256 MiB).
CE_CHUNK_LOGITS = 2**26
EMBEDDING_NORMS = ('l2', 'layernorm')


@dataclass
class CDCDConfig:
    """Architecture of the denoiser (paper §4, §6.1; defaults are the paper's base model)."""

    vocab_size: int = 30522  # Overwritten from the dataset's tokenizer when the YAML leaves it null.
    d_embed: int = 256  # Token embedding width; quality is flat for d_embed >= 64 (§6.3).
    d_model: int = 1024  # Transformer width.
    n_layers: int = 8
    n_heads: int = 16
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * d_model.
    n_fourier: int = 64  # Fourier features of c_noise(t) = ln(t) / 4.
    d_time: int = 128  # Width of the time-conditioning MLP (2 x d_time, GELU).
    dropout: float = 0.0
    embed_init_std: float = 0.001  # Tab. 1: embeddings start tiny; normalisation sets their scale.
    tie_output_head: bool = False  # Logits from similarity to the normalised embeddings.
    # How x0_hat is formed from F = softmax(logits) @ E: 'cdcd' x0_hat = F (the paper); 'edm'
    # c_skip(t) x_t + c_out(t) F with EDM's sigma_data=1 coefficients; 'tanh' (1 - tanh t) x_t + tanh(t) F.
    preconditioning: str = 'cdcd'
    # 'l2': rows L2-normalised to norm sqrt(d_embed) (the paper); 'layernorm': a LayerNorm with
    # learned gain and bias, as Difformer / simple-diffusion-lm normalise their embeddings.
    embedding_norm: str = 'l2'
    # A distilled student's steps land at a chosen time: the denoiser also reads that target time
    # t_next (a second time embedding, added to t's; zero at initialisation, so a student starts
    # as its teacher). `algorithms/distillation.py`.
    target_time: bool = False

    def __post_init__(self) -> None:
        for name, choices in (('preconditioning', PRECONDITIONINGS), ('embedding_norm', EMBEDDING_NORMS)):
            if getattr(self, name) not in choices:
                raise ValueError(f'model.{name}={getattr(self, name)!r} is not one of {", ".join(choices)}')
        for name in ('vocab_size', 'd_embed', 'd_model', 'n_layers', 'n_heads', 'n_fourier', 'd_time'):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f'model.{name}={getattr(self, name)} must be positive')
        for name in ('mlp_ratio', 'embed_init_std'):  # `not 0 < x < inf`: NaN is refused too
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f'model.{name}={getattr(self, name)} must be a positive finite number')
        if not 0 <= self.dropout < 1:
            raise ValueError(f'model.dropout={self.dropout} must lie in [0, 1)')
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f'model.d_model={self.d_model} must split into '
                f'model.n_heads={self.n_heads} heads of even width'
            )


def skip_and_out(preconditioning: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) of x0_hat = c_skip x_t + c_out F, each shaped like t.

    'edm': c_skip = 1 / (t^2 + 1), c_out = t / sqrt(t^2 + 1) (EDM Tab. 1, sigma_data = 1);
    'tanh': c_skip = 1 - tanh(t), c_out = tanh(t); 'cdcd': (0, 1), i.e. x0_hat = F.
    """
    if preconditioning == 'edm':
        return 1.0 / (t.square() + 1.0), t * torch.rsqrt(t.square() + 1.0)
    if preconditioning == 'tanh':
        return 1.0 - torch.tanh(t), torch.tanh(t)
    return torch.zeros_like(t), torch.ones_like(t)


def c_in(t: torch.Tensor) -> torch.Tensor:
    """Input scaling 1 / sqrt(t^2 + 1) for sigma_data = 1 (EDM Tab. 1). t: any shape, returns same."""
    return torch.rsqrt(t.square() + 1.0)


def c_noise(t: torch.Tensor) -> torch.Tensor:
    """Noise-level input ln(t) / 4 (EDM Tab. 1)."""
    return torch.log(t) / 4.0


class RotaryTables(NamedTuple):
    """cos and sin of the rotary angles, each (L, D_head / 2)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rotary_tables(length: int, d_head: int, device: torch.device, dtype: torch.dtype) -> RotaryTables:
    """Cos and sin of the rotary angles (RoFormer), each (L, D_head / 2), float32 math cast to dtype.

    Computed once per forward pass and shared by every layer.
    """
    inv_freq = 10000.0 ** (-torch.arange(0, d_head, 2, device=device, dtype=torch.float32) / d_head)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq  # (L, D/2)
    return RotaryTables(angles.cos().to(dtype), angles.sin().to(dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Channels i and i + D/2 of x (..., L, D) rotated by the angles of (cos, sin) (L, D/2): three kernels."""
    half = x.shape[-1] // 2
    cos2 = torch.cat((cos, cos), dim=-1)  # (L, D): tiny
    out = x * cos2
    out[..., :half].addcmul_(x[..., half:], sin, value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin)
    return out


class _Rotary(torch.autograd.Function):
    """Rotary embedding whose backward is the inverse rotation: no saved activations, no zero-filled grads."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def rotary(x: torch.Tensor, tables: RotaryTables | None = None) -> torch.Tensor:
    """Applies rotary position embeddings (RoFormer) to x: (..., L, D_head), D_head even.

    Rotate-half layout (GPT-NeoX, Llama): channels i and i + D_head/2 rotate together by
    position * 10000^(-2i / D_head). The same rotation as RoFormer's interleaved pairs (2i, 2i+1)
    up to a fixed permutation of the head's channels, which the learned q/k projections absorb;
    contiguous halves replace strided slices. `tables` (from `rotary_tables`) are computed here
    when not given.
    """
    *_, length, d_head = x.shape
    cos, sin = tables if tables is not None else rotary_tables(length, d_head, x.device, x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # No-ops when the tables were made for x's dtype.
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def layer_norm(x: torch.Tensor, shape: tuple[int, ...], eps: float) -> torch.Tensor:
    """F.layer_norm without learned affine, in autocast's compute dtype when autocast is on.

    Autocast runs layer_norm in fp32 on CUDA, which doubles the bytes it and everything after
    it moves; like llm-foundry's low-precision LayerNorm, the input is cast to the autocast
    dtype and normalised there (the kernel accumulates its statistics in fp32 anyway).
    """
    device = x.device.type
    if device != 'meta' and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
        with without_autocast(device):
            return F.layer_norm(x, shape, eps=eps)
    return F.layer_norm(x, shape, eps=eps)


def without_autocast(device: str) -> contextlib.AbstractContextManager:
    """Autocast off for `device` (a no-op on the meta device, which has no autocast)."""
    if device != 'meta':
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm whose shift and scale come from the time embedding (FiLM), zero-initialised.

    At initialisation it is a plain (affine-free) LayerNorm, so training starts from an
    ordinary transformer (§6.1). The norm runs in the autocast dtype (`layer_norm`) and the
    modulation is one fused multiply-add.
    """

    def __init__(self, d_model: int, d_time: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.modulation = nn.Linear(d_time, 2 * d_model)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d_model); time: (B, d_time). Returns (B, L, d_model)."""
        shift, scale = self.modulation(time)[:, None, :].chunk(2, dim=-1)
        normed = layer_norm(x, self.norm.normalized_shape, self.norm.eps)
        return torch.addcmul(shift.to(normed.dtype), normed, (1.0 + scale).to(normed.dtype))


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with rotary embeddings."""

    def __init__(self, config: CDCDConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
        """x: (B, L, d_model); rope: the forward pass's `rotary_tables`. Returns (B, L, d_model)."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        q, k = rotary(qkv[:2], rope).unbind(0)  # One rotation for q and k together.
        v = qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(adaLN(x)), then x + MLP(adaLN(x))."""

    def __init__(self, config: CDCDConfig) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * config.d_model)
        self.norm_attn = AdaptiveLayerNorm(config.d_model, config.d_time)
        self.attn = Attention(config)
        self.norm_mlp = AdaptiveLayerNorm(config.d_model, config.d_time)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden),
            nn.GELU(),
            nn.Linear(hidden, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, time: torch.Tensor, rope: RotaryTables) -> torch.Tensor:
        """x: (B, L, d_model); time: (B, d_time); rope: the forward pass's `rotary_tables`."""
        x = x + self.attn(self.norm_attn(x, time), rope)
        return x + self.mlp(self.norm_mlp(x, time))


class TimeEmbedding(nn.Module):
    """Fourier features of c_noise(t) = ln(t)/4, then an MLP (2 x d_time, GELU)."""

    def __init__(self, n_fourier: int, d_time: int) -> None:
        super().__init__()
        # Log-spaced frequencies from 1 to 1000 resolve ln(t)/4 (range about -0.6..1.5) finely.
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), n_fourier // 2))
        self.register_buffer('freqs', freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(n_fourier, d_time), nn.GELU(), nn.Linear(d_time, d_time), nn.GELU()
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) noise std -> (B, d_time)."""
        angles = c_noise(t.float())[:, None] * self.freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least n."""
    return -(-n // multiple) * multiple


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy (N,) float32 of (N, V) logits in any float dtype, without an fp32 copy.

    Forward: one fp32 log-softmax per chunk of rows (`CE_CHUNK_LOGITS` logits), read from the
    logits' own dtype. Backward: softmax in the logits' dtype (fp32 accumulation inside the
    kernel), scaled by the incoming gradient in place, minus it at the targets: the gradient is
    written once, in the logits' dtype, which is what the head's backward reads anyway. Only the
    logits (already alive for the head) and the targets are kept for backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        ce = torch.empty(len(logits), device=logits.device, dtype=torch.float32)
        with without_autocast(logits.device.type):
            for rows in _chunks(logits):
                log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)
                ce[rows] = -log_probs.gather(1, targets[rows, None]).squeeze(1)
        return ce

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        with without_autocast(logits.device.type):
            for rows in _chunks(logits):
                probs = out[rows]
                torch.ops.aten._softmax.out(logits[rows], -1, False, out=probs)
                g = grad[rows]
                probs.mul_(g[:, None])
                probs.scatter_add_(1, targets[rows, None], -g[:, None].to(probs.dtype))
        return out, None


def _chunks(logits: torch.Tensor) -> list[slice]:
    """Row slices of (N, V) logits, each about `CE_CHUNK_LOGITS` logits."""
    step = max(1, CE_CHUNK_LOGITS // logits.shape[-1])
    return [slice(start, start + step) for start in range(0, len(logits), step)]


def vocabulary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE in nats, float32: logits (..., V) any float dtype, targets (...) -> (...).

    Under torch.compile Inductor fuses the upcast into the reduction, so the plain expression is
    used there; eager, `_ChunkedCrossEntropy` keeps the fp32 copy of the logits to one chunk.
    Flattened to rows: the softmax runs over contiguous rows (the (B, V, L) layout that
    `cross_entropy` expects for sequences was 2.7x slower on CPU).
    """
    rows, flat_targets = logits.flatten(0, -2), targets.flatten()
    if torch.compiler.is_compiling() or not rows.is_contiguous():
        ce = F.cross_entropy(rows.float(), flat_targets, reduction='none')
    else:
        ce = _ChunkedCrossEntropy.apply(rows, flat_targets)
    return ce.view(targets.shape)


class DenoiserOutput(NamedTuple):
    """What one denoiser pass returns.

    Attributes:
        logits: (B, L, vocab_size) over the clean tokens (a view of the padded head's output).
        x0_hat: (B, L, d_embed) float32 expected embedding (Eq. 7, preconditioned), when asked for.
        embedding_error: (B, L) float32 ||x0_hat - e||^2 / d_embed per token (the auxiliary MSE
            of Difformer / simple-diffusion-lm), when asked for.
        cross_entropy: (B, L) float32 CE of the clean tokens in nats, when asked for.
    """

    logits: torch.Tensor
    x0_hat: torch.Tensor | None = None
    embedding_error: torch.Tensor | None = None
    cross_entropy: torch.Tensor | None = None


class CDCDTransformer(nn.Module):
    """Denoiser: predicts logits over the vocabulary at every position.

    Per position the input is `[c_in(t) * x_t * m, e * (1 - m), m, p * m]` (width 3*d_embed+1,
    zero-padded to a multiple of `INPUT_MULTIPLE`), where m = 1 marks positions to generate, e
    the clean embedding of given tokens and p the self-conditioning input (zeros when unused).
    The head's output is padded to `padded_vocab_size` (a multiple of `VOCAB_MULTIPLE`); the
    padded logits are -inf, so they are never predicted, sampled or counted, and every output
    is vocabulary-sized.
    """

    def __init__(self, config: CDCDConfig) -> None:
        super().__init__()
        self.config = config
        self.padded_vocab_size = round_up(config.vocab_size, VOCAB_MULTIPLE)
        self.input_width = 3 * config.d_embed + 1
        self.embedding = nn.Embedding(config.vocab_size, config.d_embed)
        if config.embedding_norm == 'layernorm':
            # eps far below the rows' variance at init (std embed_init_std = 0.001: variance 1e-6).
            self.embedding_norm = nn.LayerNorm(config.d_embed, eps=1e-12)
        self.time_embedding = TimeEmbedding(config.n_fourier, config.d_time)
        if config.target_time:
            self.target_time_embedding = TimeEmbedding(config.n_fourier, config.d_time)
        self.input_projection = nn.Linear(round_up(self.input_width, INPUT_MULTIPLE), config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = AdaptiveLayerNorm(config.d_model, config.d_time)
        if config.tie_output_head:
            self.head = nn.Linear(config.d_model, config.d_embed)
        else:
            self.head = nn.Linear(config.d_model, self.padded_vocab_size)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_pad_unaligned_weights)

    def reset_parameters(self) -> None:
        """Linear weights N(0, 0.02), biases 0, embeddings N(0, embed_init_std); adaLN stays 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, AdaptiveLayerNorm):
                nn.init.zeros_(module.modulation.weight)
                nn.init.zeros_(module.modulation.bias)
        if self.config.target_time:  # adds nothing until trained: a student starts as its teacher
            nn.init.zeros_(self.target_time_embedding.mlp[2].weight)
            nn.init.zeros_(self.target_time_embedding.mlp[2].bias)
        nn.init.normal_(self.embedding.weight, std=self.config.embed_init_std)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP shards each transformer block as its own unit (read by Composer)."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Blocks are the activation-checkpointing units when the FSDP config enables it."""
        return isinstance(module, Block)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw embedding rows (..., d_embed) -> normalised: L2 norm sqrt(d_embed) (§2.1), or LayerNorm.

        Gradients flow through the normalisation into the raw embedding table.
        """
        if self.config.embedding_norm == 'layernorm':
            return self.embedding_norm(raw)
        return F.normalize(raw, dim=-1) * math.sqrt(self.config.d_embed)

    def embedding_matrix(self) -> torch.Tensor:
        """Normalised embeddings E: (V, d_embed)."""
        return self.normalise(self.embedding.weight)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) int -> normalised embeddings (B, L, d_embed)."""
        return self.normalise(self.embedding(tokens))

    def forward(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor,
        generate_mask: torch.Tensor,
        self_cond: torch.Tensor,
        noise: torch.Tensor | None = None,
        x_t: torch.Tensor | None = None,
        expected_embedding: bool = False,
        embedding_error: bool = False,
        cross_entropy: bool = False,
        t_next: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        """Logits of the clean tokens given noisy embeddings, and what is derived from them.

        Every use of the parameters happens inside `forward`, so FSDP gathers them first; that
        is why x0_hat (which reads the embedding table) is computed here when asked for.

        Args:
            tokens: (B, L) clean token ids; read where generate_mask is 0 (given tokens) and,
                in training, to build x_t = e + t * noise.
            t: (B,) noise std per sequence.
            generate_mask: (B, L) 1 where a token is generated, 0 where it is given.
            self_cond: (B, L, d_embed) previous estimate of the expected embedding, or zeros.
            noise: (B, L, d_embed) standard normal eps (training); ignored when x_t is given.
            x_t: (B, L, d_embed) noisy embeddings (sampling), instead of tokens + noise.
            expected_embedding: Fill in `x0_hat`.
            embedding_error: Fill in `embedding_error`.
            cross_entropy: Fill in `cross_entropy`, the CE of `tokens`.
            t_next: (B,) the time this step lands at; read (and required) by a distilled student
                (`CDCDConfig.target_time`) only.

        Returns:
            A `DenoiserOutput`; the fields not asked for are None.
        """
        clean = self.embed(tokens)  # (B, L, D)
        if x_t is None:
            if noise is None:
                raise ValueError('CDCDTransformer.forward needs noise or x_t')
            x_t = clean + t[:, None, None].to(clean.dtype) * noise.to(clean.dtype)
        m = generate_mask.to(x_t.dtype)[..., None]  # (B, L, 1)
        scale = c_in(t).to(x_t.dtype)[:, None, None]
        parts = [scale * x_t * m, clean * (1.0 - m), m, self_cond.to(x_t.dtype) * m]
        pad = self.input_projection.in_features - self.input_width
        if pad:
            parts.append(m.new_zeros(*m.shape[:-1], pad))
        h = self.input_projection(torch.cat(parts, dim=-1))  # (B, L, d_model)
        time = self.time_conditioning(t, t_next).to(h.dtype)  # (B, d_time)
        rope = rotary_tables(h.shape[1], self.config.d_model // self.config.n_heads, h.device, h.dtype)
        for block in self.blocks:
            h = block(h, time, rope)
        padded = self.padded_logits(self.norm_out(h, time))
        logits = padded[..., : self.config.vocab_size]
        x0_hat = self.denoised(padded, x_t, t) if expected_embedding or embedding_error else None
        error = (x0_hat - clean.float()).square().mean(-1) if embedding_error else None
        ce = vocabulary_cross_entropy(padded, tokens) if cross_entropy else None
        return DenoiserOutput(logits, x0_hat if expected_embedding else None, error, ce)

    def time_conditioning(self, t: torch.Tensor, t_next: torch.Tensor | None) -> torch.Tensor:
        """(B, d_time): t's embedding, plus the landing time's for a distilled student (`target_time`)."""
        time = self.time_embedding(t)
        if not self.config.target_time:
            return time
        if t_next is None:
            raise ValueError(
                'a distilled denoiser (model.target_time) needs t_next, the time its step lands at'
            )
        return time + self.target_time_embedding(t_next)

    def padded_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Head output (B, L, padded_vocab_size) with the padded logits at -inf."""
        logits = self.head(h)
        if self.config.tie_output_head:
            table = F.pad(self.embedding_matrix(), (0, 0, 0, self.padded_vocab_size - self.config.vocab_size))
            logits = logits @ table.t().to(logits.dtype)
        if self.padded_vocab_size > self.config.vocab_size:
            with torch.no_grad():  # a few columns; their softmax is 0, so their gradient is too
                logits[..., self.config.vocab_size :] = float('-inf')
        return logits

    def denoised(self, logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat = c_skip(t) x_t + c_out(t) softmax(logits) @ E, float32 (B, L, d_embed); t: (B,)."""
        expected = self.expected_embedding(logits)
        if self.config.preconditioning == 'cdcd':
            return expected
        c_skip, c_out = skip_and_out(self.config.preconditioning, t.float())
        return c_skip[:, None, None] * x_t.float() + c_out[:, None, None] * expected

    def expected_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """x0_hat = softmax(logits) @ E with the normalised E (Eq. 7): (B, L, V or padded) -> (B, L, d_embed).

        Always float32, autocast or not: a softmax over the vocabulary read from the logits' dtype
        and a float32 product (TF32 where the caller allows it). It feeds the sampler's ODE and
        self-conditioning, whose input it is.
        """
        with without_autocast(logits.device.type):
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., : self.config.vocab_size]
            return probs @ self.embedding_matrix().float()

    def non_embedding_parameters(self) -> int:
        """Parameter count without the embedding table, the vocabulary-sized output head and padding."""
        vocab_sized = {id(self.embedding.weight)}
        if not self.config.tie_output_head:
            vocab_sized |= {id(self.head.weight), id(self.head.bias)}
        counted = sum(p.numel() for p in self.parameters() if id(p) not in vocab_sized)
        return counted - self.alignment_padding()[1] * self.config.d_model

    def alignment_padding(self) -> tuple[int, int]:
        """(Head rows past the vocabulary, input columns past 3 d_embed + 1): GEMM alignment, not capacity.

        Parameter counts and model FLOPs (MFU) leave them out.
        """
        rows = 0 if self.config.tie_output_head else self.head.out_features - self.config.vocab_size
        return rows, self.input_projection.in_features - self.input_width


def _pad_unaligned_weights(
    module: CDCDTransformer, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load pre-hook: weights saved before the head and the input were padded load, zero-padded."""
    config = module.config
    unpadded = {'input_projection.weight': (config.d_model, module.input_width)}
    if not config.tie_output_head:
        unpadded |= {'head.weight': (config.vocab_size, config.d_model), 'head.bias': (config.vocab_size,)}
    for name, shape in unpadded.items():
        saved = state_dict.get(prefix + name)
        target = module.get_parameter(name)
        if isinstance(saved, torch.Tensor) and tuple(saved.shape) == shape and saved.shape != target.shape:
            grow = [size - old for size, old in zip(target.shape, shape)]
            state_dict[prefix + name] = F.pad(saved, [x for g in reversed(grow) for x in (0, g)])


def score(x0_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score interpolation s(x, t) = (x0_hat - x) / t^2 (Eq. 8).

    x0_hat, x: (B, L, D); t: (B,) per sequence or a scalar tensor for the whole batch.
    """
    return (x0_hat - x) / t.square().reshape(-1, 1, 1)


def compile_denoiser(denoiser: CDCDTransformer, options: dict[str, Any]) -> None:
    """Compiles the denoiser in place with `torch.compile(**options)` (the YAML's `compile_config`).

    What runs the denoiser is compiled: the training pass, self-conditioning's pass, evaluation
    and sampling (Composer's own `compile_config` compiles only `ComposerModel.forward`, whose
    seeded draws break its graph, and leaves the others eager). Unsharded, the whole forward is
    one graph: it has no graph break (`torch._dynamo.explain`, tests/test_model.py). Under FSDP
    the blocks carry FSDP's hooks, which stay eager: each block's forward is compiled instead
    (torchtitan's per-block pattern). Modules, parameters and state-dict keys are unchanged, so
    checkpoints load either way.
    """
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(block, FSDPModule) for block in denoiser.blocks):
        for block in denoiser.blocks:
            block.forward = _batch_dynamic(torch.compile(block.forward, **options))
    else:
        denoiser.forward = _batch_dynamic(torch.compile(denoiser.forward, **options))


def _batch_dynamic(compiled: Any) -> Any:
    """`compiled`, told that dim 0 of every tensor argument (the batch) may vary.

    A run calls the denoiser at many batch sizes (microbatches, self-conditioning's chosen
    examples, evaluation, the NLL bound, training samples). Marked before the first call, each
    kind of call (grad mode, train or eval, which outputs) compiles once for every batch size,
    instead of once static and once more dynamic: a real run's mix stays well under dynamo's
    recompile limit (tests/test_compile.py).
    """

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim():
                torch._dynamo.maybe_mark_dynamic(value, 0)
        return compiled(*args, **kwargs)

    return call
