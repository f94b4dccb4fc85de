"""The time warp's distribution of noise levels, without its fitting: torch only.

F(t) is monotone piecewise linear on t' = (t - t_min) / (t_max - t_min) with `n_bins` equal-width
bins, so it is fully described by the probability mass of each bin. Sampling needs only this
(the timesteps t_i = F^-1(u_i)), so it stands alone: the Hugging Face export copies this module
into its modelling code (`cdcd_composer.hf`). `cdcd_composer.time_warping.TimeWarp` adds the fit.
"""

from __future__ import annotations

import torch


class WarpCurve:
    """The normalised CDF F(t) as `n_bins` equal-width bins on [t_min, t_max] with masses m_k.

    Within bin k (t' in [k/N, (k+1)/N)) F is linear: F(t) = M_k + m_k (N t' - k), with
    M_k = sum_{j<k} m_j. Without `masses` it is uniform (m_k = 1/N), i.e. t ~ U[t_min, t_max].

    Args:
        t_min: Smallest noise std.
        t_max: Largest noise std.
        n_bins: Number of bins N (ignored when `masses` is given).
        masses: (N,) bin masses summing to 1 (float64 kept as given).
    """

    def __init__(
        self, t_min: float = 1.0, t_max: float = 300.0, n_bins: int = 100, masses: torch.Tensor | None = None
    ) -> None:
        if not 0 < t_min < t_max:
            raise ValueError(f'need 0 < diffusion.t_min < diffusion.t_max, got t_min={t_min}, t_max={t_max}')
        n_bins = n_bins if masses is None else masses.numel()
        if n_bins < 2:
            raise ValueError(f'time warp n_bins={n_bins} must be at least 2')
        self.t_min, self.t_max, self.n_bins = float(t_min), float(t_max), n_bins
        if masses is None:
            masses = torch.full((n_bins,), 1.0 / n_bins, dtype=torch.float64)
        self.masses = masses.double()
        # Copies of the curve on the devices it is evaluated on: (masses it was copied from, M, m).
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _unit(self, t: torch.Tensor) -> torch.Tensor:
        """The unit time t' = (t - t_min) / (t_max - t_min), clamped to [0, 1], float64."""
        return ((t.double() - self.t_min) / (self.t_max - self.t_min)).clamp(0.0, 1.0)

    def _bin(self, unit: torch.Tensor) -> torch.Tensor:
        return (unit * self.n_bins).floor().long().clamp(0, self.n_bins - 1)

    def _cumulative(self) -> torch.Tensor:
        """(N + 1,) M_k with M_0 = 0 and M_N = 1."""
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), self.masses.cumsum(0)])
        cum[-1] = 1.0
        return cum

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, m) of `_cumulative` and `masses` on `device`, copied once per curve.

        Evaluating the curve where t lives keeps the training step free of host syncs: nothing
        is copied back to the CPU, and the tables travel to the device once after each refit.
        """
        cached = self._device_tables.get(device)
        if cached is None or cached[0] is not self.masses:
            copy = {'device': device, 'non_blocking': True}
            cached = (self.masses, self._cumulative().to(**copy), self.masses.to(**copy))
            self._device_tables[device] = cached
        return cached[1], cached[2]

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """F(t) = M_k + m_k (N t' - k) for t' in bin k. Any shape; float64 in [0, 1] on t's device."""
        cum, masses = self._tables(t.device)
        unit = self._unit(t.detach())
        k = self._bin(unit)
        out = cum[k] + masses[k] * (unit * self.n_bins - k)
        return torch.where(unit >= 1.0, 1.0, out)

    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """F^-1(u): t' = (k + (u - M_k) / m_k) / N for the bin k with M_k <= u < M_{k+1}.

        Any shape; returns float32 t on u's device.
        """
        cum, masses = self._tables(u.device)
        u64 = u.detach().double().clamp(0.0, 1.0)
        k = (torch.searchsorted(cum, u64, right=True) - 1).clamp(0, self.n_bins - 1)
        frac = ((u64 - cum[k]) / masses[k].clamp_min(1e-300)).clamp(0.0, 1.0)
        unit = (k + frac) / self.n_bins
        return (self.t_min + unit * (self.t_max - self.t_min)).float()

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """F'(t) = m_k N / (t_max - t_min) for t in bin k, per unit of t. Any shape, float64 on t's device."""
        _, masses = self._tables(t.device)
        k = self._bin(self._unit(t.detach()))
        return masses[k] * self.n_bins / (self.t_max - self.t_min)

    def sampling_timesteps(self, n_steps: int) -> torch.Tensor:
        """n_steps + 1 decreasing times: u evenly spaced from 1 to 0, t_i = F^-1(u_i) (§6.1)."""
        return self.inverse_cdf(torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64))

    def quantile(self, q: float) -> float:
        """The t below which a fraction q of the training samples fall: F^-1(q)."""
        return float(self.inverse_cdf(torch.tensor([q], dtype=torch.float64))[0])
