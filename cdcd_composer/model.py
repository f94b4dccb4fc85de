"""The CDCD denoiser: a time-conditioned bidirectional transformer over noisy token embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

PRECONDITIONINGS = ('cdcd', 'edm', 'tanh')
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


def rotary(x: torch.Tensor, tables: RotaryTables | None = None) -> torch.Tensor:
    """Applies rotary position embeddings (RoFormer) to x: (..., L, D_head), D_head even.

    Consecutive channel pairs (2i, 2i+1) rotate by position * 10000^(-2i / D_head).
    `tables` (from `rotary_tables`) are computed here when not given.
    """
    *_, length, d_head = x.shape
    cos, sin = tables if tables is not None else rotary_tables(length, d_head, x.device, x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # No-ops when the tables were made for x's dtype.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm whose shift and scale come from the time embedding (FiLM), zero-initialised.

    At initialisation it is a plain (affine-free) LayerNorm, so training starts from an
    ordinary transformer (§6.1).
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
        return self.norm(x) * (1.0 + scale) + shift


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


class DenoiserOutput(NamedTuple):
    """What one denoiser pass returns.

    Attributes:
        logits: (B, L, vocab_size) over the clean tokens.
        x0_hat: (B, L, d_embed) float32 expected embedding (Eq. 7, preconditioned), when asked for.
        embedding_error: (B, L) float32 ||x0_hat - e||^2 / d_embed per token (the auxiliary MSE
            of Difformer / simple-diffusion-lm), when asked for.
    """

    logits: torch.Tensor
    x0_hat: torch.Tensor | None = None
    embedding_error: torch.Tensor | None = None


class CDCDTransformer(nn.Module):
    """Denoiser: predicts logits over the vocabulary at every position.

    Per position the input is `[c_in(t) * x_t * m, e * (1 - m), m, p * m]` (width 3*d_embed+1),
    where m = 1 marks positions to generate, e the clean embedding of given tokens and p the
    self-conditioning input (zeros when unused).
    """

    def __init__(self, config: CDCDConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_embed)
        if config.embedding_norm == 'layernorm':
            # eps far below the rows' variance at init (std embed_init_std = 0.001: variance 1e-6).
            self.embedding_norm = nn.LayerNorm(config.d_embed, eps=1e-12)
        self.time_embedding = TimeEmbedding(config.n_fourier, config.d_time)
        self.input_projection = nn.Linear(3 * config.d_embed + 1, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = AdaptiveLayerNorm(config.d_model, config.d_time)
        if config.tie_output_head:
            self.head = nn.Linear(config.d_model, config.d_embed)
        else:
            self.head = nn.Linear(config.d_model, config.vocab_size)
        self.reset_parameters()

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
        features = torch.cat([scale * x_t * m, clean * (1.0 - m), m, self_cond.to(x_t.dtype) * m], dim=-1)
        h = self.input_projection(features)  # (B, L, d_model)
        time = self.time_embedding(t).to(h.dtype)  # (B, d_time)
        rope = rotary_tables(h.shape[1], self.config.d_model // self.config.n_heads, h.device, h.dtype)
        for block in self.blocks:
            h = block(h, time, rope)
        logits = self.head(self.norm_out(h, time))
        if self.config.tie_output_head:
            logits = logits @ self.embedding_matrix().t().to(logits.dtype)
        x0_hat = self.denoised(logits, x_t, t) if expected_embedding or embedding_error else None
        error = (x0_hat - clean.float()).square().mean(-1) if embedding_error else None
        return DenoiserOutput(logits, x0_hat if expected_embedding else None, error)

    def denoised(self, logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat = c_skip(t) x_t + c_out(t) softmax(logits) @ E, float32 (B, L, d_embed); t: (B,)."""
        expected = self.expected_embedding(logits)
        if self.config.preconditioning == 'cdcd':
            return expected
        c_skip, c_out = skip_and_out(self.config.preconditioning, t.float())
        return c_skip[:, None, None] * x_t.float() + c_out[:, None, None] * expected

    def expected_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """x0_hat = softmax(logits) @ E with the normalised E (Eq. 7). (B, L, V) -> (B, L, d_embed)."""
        probs = logits.float().softmax(dim=-1)
        return probs @ self.embedding_matrix().float()

    def non_embedding_parameters(self) -> int:
        """Parameter count without the embedding table and the vocabulary-sized output head."""
        vocab_sized = {id(self.embedding.weight)}
        if not self.config.tie_output_head:
            vocab_sized |= {id(self.head.weight), id(self.head.bias)}
        return sum(p.numel() for p in self.parameters() if id(p) not in vocab_sized)


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
            block.forward = torch.compile(block.forward, **options)
    else:
        denoiser.forward = torch.compile(denoiser.forward, **options)
