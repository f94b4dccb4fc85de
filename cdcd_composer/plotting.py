"""Figures: the entropy-vs-t curve of time warping (paper Fig. 2) and the learned density of t."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cdcd_composer.time_warping import BinnedLoss, TimeWarp


def plot_time_warp(
    warp: TimeWarp, t: torch.Tensor, loss: torch.Tensor, history: list[dict[str, Any]], title: str = ''
) -> np.ndarray:
    """The paper's Fig. 2 for the current run, beside the learned distribution of t moving over refits.

    Left: recent (t, CE) pairs, their per-bin means, the fitted F~(t) and fainter earlier fits.
    Right: the training density of t per unit of ln t (t F'(t)), one line per refit in the
    history, from faint (oldest) to bold (the installed curve), above the uniform start.

    Args:
        warp: The current curve (its last fit is drawn boldest).
        t: (n,) noise levels of the recent pairs.
        loss: (n,) their per-sequence cross-entropy, nats.
        history: Earlier fits as {'offset': float, 'heights': list[float], 'masses': list[float],
            'batch': int}, oldest first.
        title: Figure title.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax, ax_density) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    grid = torch.logspace(np.log10(warp.t_min), np.log10(warp.t_max), 400, dtype=torch.float64)
    _plot_loss(ax, warp, t, loss, history, grid, title)
    _plot_density(ax_density, warp, history, grid)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _fading(history: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bool, float, int]]:
    """(fit, is the last, alpha, line width) per fit of the history: old ones faint, the last bold."""
    for age, fit in enumerate(history):
        last = age == len(history) - 1
        yield fit, last, 1.0 if last else 0.15 + 0.5 * age / len(history), 2 if last else 1


def _plot_loss(
    ax: Any,
    warp: TimeWarp,
    t: torch.Tensor,
    loss: torch.Tensor,
    history: list[dict[str, Any]],
    grid: torch.Tensor,
    title: str,
) -> None:
    """Left panel: recent (t, CE) pairs, their bin means and the fitted F~(t) of each refit."""
    ax.scatter(t.numpy(), loss.numpy(), s=2, alpha=0.2, color='tab:gray', label='recent (t, CE)')
    bins = BinnedLoss.of(warp._bin(warp._unit(t.double())), loss.double(), warp.n_bins)
    edges = torch.linspace(warp.t_min, warp.t_max, warp.n_bins + 1, dtype=torch.float64)
    occupied = bins.counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[occupied]
    ax.plot(
        centres.numpy(), bins.means[occupied].numpy(), '.', color='black', markersize=3, label='bin means'
    )
    ramps = warp._ramps(warp._unit(grid))
    for fit, last, alpha, width in _fading(history):
        curve = fit['offset'] + ramps @ torch.tensor(fit['heights'], dtype=torch.float64)
        label = 'fitted F~(t)' if last else None
        ax.plot(grid.numpy(), curve.numpy(), color='tab:blue', alpha=alpha, linewidth=width, label=label)
    ax.set_xscale('log')
    ax.set_xlabel('t (noise std)')
    ax.set_ylabel('cross-entropy (nats)')
    ax.set_title(f'time warp {title}'.strip())
    ax.legend(loc='lower right')


def _plot_density(ax: Any, warp: TimeWarp, history: list[dict[str, Any]], grid: torch.Tensor) -> None:
    """Right panel: the training density of t per unit of ln t after each refit, above the uniform start."""
    uniform = TimeWarp(warp.t_min, warp.t_max, n_bins=warp.n_bins)
    ax.plot(grid.numpy(), (grid * uniform.density(grid)).numpy(), '--', color='gray', label='uniform')
    for index, (fit, last, alpha, width) in enumerate(_fading(history)):
        curve_warp = TimeWarp(warp.t_min, warp.t_max, n_bins=warp.n_bins)
        curve_warp.masses = torch.tensor(fit['masses'], dtype=torch.float64)
        label = f'batch {fit["batch"]}' if last or index == 0 else None
        density = grid * curve_warp.density(grid)
        ax.plot(grid.numpy(), density.numpy(), color='tab:red', alpha=alpha, linewidth=width, label=label)
    ax.set_xscale('log')
    ax.set_xlabel('t (noise std)')
    ax.set_ylabel("training density of t per unit ln t: t F'(t)")
    ax.set_title(f'where training samples t ({warp.quantile(0.5):.1f} = median)')
    ax.legend(loc='upper right')
