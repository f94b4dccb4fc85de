"""Distributions of the noise level t for training and sampling (uniform until time warping is fitted)."""

from __future__ import annotations

import torch


def low_discrepancy_uniform(
    n: int, device: torch.device | str = 'cpu', generator: torch.Generator | None = None
):
    """Stratified u in [0, 1): u_b = (b + U) / n mod 1 with one U ~ U[0, 1) per call. Returns (n,)."""
    offset = torch.rand((), device=device, generator=generator)
    return torch.remainder((torch.arange(n, device=device) + offset) / n, 1.0)


class UniformTime:
    """t ~ U[t_min, t_max]: the CDF F(t) = (t - t_min) / (t_max - t_min).

    Exposes the interface a fitted time warp will keep: `cdf`, `inverse_cdf`, `sample_t`
    and `sampling_timesteps`.

    Args:
        t_min: Smallest noise std (paper: 1.0; 0.1 for small embedding widths, §6.3).
        t_max: Largest noise std (paper: 300.0).
    """

    def __init__(self, t_min: float = 1.0, t_max: float = 300.0) -> None:
        if not 0 < t_min < t_max:
            raise ValueError(f'need 0 < diffusion.t_min < diffusion.t_max, got t_min={t_min}, t_max={t_max}')
        self.t_min, self.t_max = float(t_min), float(t_max)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """F(t) in [0, 1]; t of any shape."""
        return ((t - self.t_min) / (self.t_max - self.t_min)).clamp(0.0, 1.0)

    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """F^-1(u) for u in [0, 1]; returns t of the same shape."""
        return self.t_min + u * (self.t_max - self.t_min)

    def sample_t(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """N noise levels t = F^-1(u) with low-discrepancy u. Returns (n,) float32."""
        return self.inverse_cdf(low_discrepancy_uniform(n, device))

    def sampling_timesteps(self, n_steps: int) -> torch.Tensor:
        """n_steps + 1 decreasing times from t_max to t_min: u evenly spaced from 1 to 0, t = F^-1(u)."""
        return self.inverse_cdf(torch.linspace(1.0, 0.0, n_steps + 1))
