"""Time warping (paper §3.3, App. A): a learned distribution of the noise level t.

The unnormalised CDF F~(t) is fitted to the per-sequence cross-entropy L(t): where the loss
changes quickly with t, training concentrates its samples. F~ is monotone piecewise linear on
t' = (t - t_min) / (t_max - t_min) with equal-width bins, so the normalised CDF F is fully
described by the probability mass of each bin; before the first fit it is uniform.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import curve_fit, nnls

log = logging.getLogger(__name__)

WARP_SHAPES = ('piecewise', 'cauchy')


def low_discrepancy_uniform(
    n: int, device: torch.device | str = 'cpu', generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stratified u in [0, 1): u_b = (b + U) / n mod 1 with one U ~ U[0, 1) per call. Returns (n,)."""
    offset = torch.rand((), device=device, generator=generator)
    return torch.remainder((torch.arange(n, device=device) + offset) / n, 1.0)


@dataclass
class FitReport:
    """What a refit did: `accepted` is False when the previous curve was kept, `reason` says why."""

    accepted: bool
    reason: str
    residual: float = float('nan')  # Weighted RMS of F~(t_i) - L_i, nats.
    explained: float = float('nan')  # Weighted R^2 of the fit against a constant.
    n_points: int = 0


class TimeWarp:
    """The normalised CDF F(t) as `n_bins` equal-width bins on [t_min, t_max] with masses m_k.

    Within bin k (t' in [k/N, (k+1)/N)) F is linear: F(t) = M_k + m_k (N t' - k), with
    M_k = sum_{j<k} m_j. Starts uniform (m_k = 1/N), i.e. t ~ U[t_min, t_max].

    Args:
        t_min: Smallest noise std.
        t_max: Largest noise std.
        n_bins: Number of bins N.
        mu: Weight of the uniform component mixed into every fit (robustness, App. A).
        temperature: T; the fitted density is raised to 1/T before mixing (T > 1 flattens it).
        shape: 'piecewise' (the paper's fit) or 'cauchy' (the earlier reproduction's curve).
        max_weight: Importance weights 1/F'(t) are capped at this multiple of their mean, so
            the few points drawn from the mu-floor cannot dominate a fit.
        min_explained: A fit that explains less than this fraction of the weighted variance of
            the losses (R^2) is noise, not a curve: the previous curve is kept.
    """

    def __init__(
        self,
        t_min: float = 1.0,
        t_max: float = 300.0,
        n_bins: int = 100,
        mu: float = 0.01,
        temperature: float = 1.0,
        shape: str = 'piecewise',
        max_weight: float = 10.0,
        min_explained: float = 0.1,
    ) -> None:
        if not 0 < t_min < t_max:
            raise ValueError(f'need 0 < diffusion.t_min < diffusion.t_max, got t_min={t_min}, t_max={t_max}')
        if n_bins < 2:
            raise ValueError(f'time warp n_bins={n_bins} must be at least 2')
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f'time warp mu={mu} must lie in [0, 1]')
        if temperature <= 0:
            raise ValueError(f'time warp temperature={temperature} must be positive')
        if shape not in WARP_SHAPES:
            raise ValueError(f'time warp shape {shape!r} is not one of {WARP_SHAPES}')
        if max_weight < 1:
            raise ValueError(f'time warp max_weight={max_weight} must be at least 1')
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.n_bins, self.mu, self.temperature, self.shape = n_bins, mu, temperature, shape
        self.max_weight, self.min_explained = max_weight, min_explained
        self.masses = torch.full((n_bins,), 1.0 / n_bins, dtype=torch.float64)
        # Copies of the curve on the devices it is evaluated on: (masses it was copied from, M, m).
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # The last accepted fit of the unnormalised curve: F~(t') = offset + sum_k h_k ramp_k(t').
        self.fit_offset = 0.0
        self.fit_heights = torch.zeros(n_bins, dtype=torch.float64)

    def config(self) -> dict[str, float | int | str]:
        """The constructor arguments, to rebuild an identical warp (e.g. in `generate.py`)."""
        return {
            't_min': self.t_min,
            't_max': self.t_max,
            'n_bins': self.n_bins,
            'mu': self.mu,
            'temperature': self.temperature,
            'shape': self.shape,
            'max_weight': self.max_weight,
            'min_explained': self.min_explained,
        }

    # -- the distribution ------------------------------------------------------------------
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

    def sample_t(
        self, n: int, device: torch.device | str = 'cpu', generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draws t = F^-1(u) with low-discrepancy u (one shared offset). Returns (n,) float32."""
        return self.inverse_cdf(low_discrepancy_uniform(n, device, generator))

    def sampling_timesteps(self, n_steps: int) -> torch.Tensor:
        """n_steps + 1 decreasing times: u evenly spaced from 1 to 0, t_i = F^-1(u_i) (§6.1)."""
        return self.inverse_cdf(torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64))

    def quantile(self, q: float) -> float:
        """The t below which a fraction q of the training samples fall: F^-1(q)."""
        return float(self.inverse_cdf(torch.tensor([q], dtype=torch.float64))[0])

    def unnormalised(self, t: torch.Tensor) -> torch.Tensor:
        """The last fitted F~(t) = offset + sum_k h_k ramp_k(t'), in nats (zeros before any fit)."""
        return self.fit_offset + self._ramps(self._unit(t.detach().cpu())) @ self.fit_heights

    # -- fitting ---------------------------------------------------------------------------
    def _ramps(self, unit: torch.Tensor) -> torch.Tensor:
        """(n, N) design matrix: ramp_k(t') = clamp(N t' - k, 0, 1), the rise of F~ inside bin k."""
        return (unit[:, None] * self.n_bins - torch.arange(self.n_bins, dtype=torch.float64)).clamp(0.0, 1.0)

    def _masses_from_heights(self, heights: torch.Tensor) -> torch.Tensor:
        """m_k = (1 - mu) h_k^(1/T) / sum_j h_j^(1/T) + mu / N (uniform mixture, temperature T)."""
        tempered = heights.clamp_min(0.0) ** (1.0 / self.temperature)
        return (1.0 - self.mu) * tempered / tempered.sum() + self.mu / self.n_bins

    def fit(
        self,
        t: torch.Tensor,
        loss: torch.Tensor,
        density: torch.Tensor | None = None,
        min_points: int | None = None,
    ) -> FitReport:
        """Refits the curve to (t_i, L_i) pairs and installs it, or keeps the old one and says why.

        Minimises sum_i w_i (F~(t_i) - L_i)^2 with w_i = 1 / F'(t_i) under the curve t_i was
        drawn from (capped at `max_weight` times the mean), over F~ = offset + sum_k h_k ramp_k
        with h_k >= 0 (non-negative least squares: exact and deterministic). F is F~ normalised,
        then tempered and mixed with the uniform distribution. No gradient reaches the model.

        Args:
            t: (n,) noise levels the losses were measured at.
            loss: (n,) per-sequence cross-entropy, nats.
            density: (n,) F'(t_i) of the curve each t_i was drawn from (default: the current one).
            min_points: Fewest points to fit (default: 2 per bin).
        """
        t64, y = t.detach().cpu().double().flatten(), loss.detach().cpu().double().flatten()
        f_prime = self.density(t64) if density is None else density.detach().cpu().double().flatten()
        keep = torch.isfinite(t64) & torch.isfinite(y) & (f_prime > 0)
        t64, y, f_prime = t64[keep], y[keep], f_prime[keep]
        n_points = int(t64.numel())
        needed = 2 * self.n_bins if min_points is None else min_points
        if n_points < needed:
            return FitReport(False, f'too few points ({n_points} < {needed})', n_points=n_points)
        if float(y.max() - y.min()) <= 1e-9:
            return FitReport(False, 'flat data: every loss is equal', n_points=n_points)
        weights = 1.0 / f_prime
        weights = (weights / weights.mean()).clamp_max(self.max_weight)
        weights = weights / weights.mean()
        unit = self._unit(t64)
        if self.shape == 'piecewise':
            offset, heights = self._fit_piecewise(unit, y, weights)
        else:
            offset, heights = self._fit_cauchy(unit, y, weights)
        if heights is None or not torch.isfinite(heights).all() or float(heights.sum()) <= 1e-12:
            return FitReport(False, 'degenerate fit: the loss does not rise with t', n_points=n_points)
        prediction = offset + self._ramps(unit) @ heights
        residual = float((weights * (prediction - y) ** 2).mean())
        variance = float((weights * (y - (weights * y).mean()) ** 2).mean())
        explained = 1.0 - residual / variance
        report = FitReport(True, 'ok', math.sqrt(residual), explained, n_points)
        if explained < self.min_explained:
            report.accepted = False
            report.reason = (
                f'the fit explains {explained:.1%} < {self.min_explained:.0%} of the loss variance'
            )
            return report
        self.masses = self._masses_from_heights(heights)
        self.fit_offset, self.fit_heights = float(offset), heights
        return report

    def _fit_piecewise(self, unit: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        # The offset is a free column; it comes out >= 0 anyway since cross-entropy is non-negative.
        design = torch.cat([torch.ones(unit.numel(), 1, dtype=torch.float64), self._ramps(unit)], dim=1)
        root_w = w.sqrt()
        solution, _ = nnls(
            (design * root_w[:, None]).numpy(), (y * root_w).numpy(), maxiter=50 * design.shape[1]
        )
        solution = torch.from_numpy(solution)
        return float(solution[0]), solution[1:]

    def _fit_cauchy(self, unit: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        """F~(t') = h (arctan((t' - c) / s) / pi + 1/2) + o by weighted least squares, then binned."""

        def curve(x, h, c, s, o):
            return h * (np.arctan((x - c) / s) / math.pi + 0.5) + o

        start = (float(y.max() - y.min()), 0.2, 0.1, float(y.min()))
        try:
            (h, c, s, o), _ = curve_fit(
                curve, unit.numpy(), y.numpy(), p0=start, sigma=(1.0 / w.sqrt()).numpy(), maxfev=5000,
                bounds=([0.0, -1.0, 1e-4, -np.inf], [np.inf, 2.0, 10.0, np.inf]),
            )  # fmt: skip
        except (RuntimeError, ValueError) as e:
            log.info('cauchy time-warp fit failed: %s', e)
            return 0.0, None
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        return float(curve(0.0, h, c, s, o)), torch.from_numpy(np.diff(curve(edges, h, c, s, o)))

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fixed-shape tensors only (sharded checkpoints need stable shapes)."""
        return {
            'masses': self.masses.clone(),
            'fit_heights': self.fit_heights.clone(),
            'fit_offset': torch.tensor(self.fit_offset, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores a curve saved by `state_dict` (bin counts must match)."""
        if state['masses'].numel() != self.n_bins:
            raise ValueError(
                f'the checkpointed time warp has {state["masses"].numel()} bins, the config {self.n_bins}; '
                'set the same n_bins'
            )
        self.masses = state['masses'].double().clone()
        self.fit_heights = state['fit_heights'].double().clone()
        self.fit_offset = float(state['fit_offset'])
