"""The Hugging Face config of an exported CDCD model (`model_type` 'cdcd'): transformers only.

`python export.py ... --format hf` copies this file as is into the export folder, where
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` finds it through `auto_map`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

HF_FORMAT = 2  # bumped when the folder's layout changes (2: head padded to 64); read: its own only


class CDCDHFConfig(PretrainedConfig):
    """Everything besides tensors that sampling needs: the run spec without its tokenizer.

    Args:
        denoiser: The denoiser's architecture (`cdcd_composer.model.CDCDConfig` as a dict).
        t_min: Smallest noise std (sampling ends here).
        t_max: Largest noise std (sampling starts here).
        seq_len: Canvas length L, in tokens.
        padded: One story per canvas, padded (False: stories packed into full windows).
        self_conditioning: Training probability of self-conditioning (None: trained without it).
        weights: 'ema' (moving averages) or 'raw' (as trained): which weights the folder holds.
        time_warp_masses: (N,) bin masses of the fitted time warp on [t_min, t_max] (float64
            values; sampling takes its timesteps from it).
        dataset: The training data's description (source, sizes, tokenizer and its SHA-256).
        training: Batches, samples and tokens trained, where the export knew them.
        hf_format: The folder layout's version (`HF_FORMAT`).
        weights_sha256: `tensors_sha256` of the weights file's tensors, kept here, outside the file
            it checks, so that another run's weights of the same shapes are refused.
        tokenizer_sha256: `tokenizer_sha256` of the folder's tokenizer: a swapped one is refused.
        sampling: How the model samples by default where that belongs to it (a distilled student's
            solver, temperature, count and times: `RunSpec.sampling`); None: the library's defaults.
    """

    model_type = 'cdcd'

    def __init__(
        self,
        denoiser: dict[str, Any] | None = None,
        t_min: float = 1.0,
        t_max: float = 300.0,
        seq_len: int = 128,
        padded: bool = True,
        self_conditioning: float | None = None,
        weights: str = 'raw',
        time_warp_masses: list[float] | None = None,
        dataset: dict[str, Any] | None = None,
        training: dict[str, int] | None = None,
        hf_format: int = HF_FORMAT,
        weights_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        sampling: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.denoiser = denoiser or {}
        self.t_min, self.t_max, self.seq_len, self.padded = t_min, t_max, seq_len, padded
        self.self_conditioning, self.weights = self_conditioning, weights
        self.time_warp_masses = time_warp_masses
        self.dataset, self.training, self.hf_format = dataset, training, hf_format
        self.weights_sha256, self.tokenizer_sha256 = weights_sha256, tokenizer_sha256
        self.sampling = sampling
        self.vocab_size = self.denoiser.get('vocab_size')
        super().__init__(**kwargs)
