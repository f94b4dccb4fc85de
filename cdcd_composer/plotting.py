"""Figures: the entropy-vs-t curve of time warping (paper Fig. 2) and the learned density of t."""

from __future__ import annotations

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
            'batch': int}, oldest first ('masses' and 'batch' may be missing in older runs).
        title: Figure title.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax, ax_density) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax.scatter(t.numpy(), loss.numpy(), s=2, alpha=0.2, color='tab:gray', label='recent (t, CE)')
    bins = BinnedLoss.of(warp._bin(warp._unit(t.double())), loss.double(), warp.n_bins)
    edges = torch.linspace(warp.t_min, warp.t_max, warp.n_bins + 1, dtype=torch.float64)
    occupied = bins.counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[occupied]
    ax.plot(
        centres.numpy(), bins.means[occupied].numpy(), '.', color='black', markersize=3, label='bin means'
    )
    grid = torch.logspace(np.log10(warp.t_min), np.log10(warp.t_max), 400, dtype=torch.float64)
    ramps = warp._ramps(warp._unit(grid))
    uniform = TimeWarp(warp.t_min, warp.t_max, n_bins=warp.n_bins)
    ax_density.plot(grid.numpy(), (grid * uniform.density(grid)).numpy(), '--', color='gray', label='uniform')
    for age, fit in enumerate(history):
        last = age == len(history) - 1
        alpha = 1.0 if last else 0.15 + 0.5 * age / len(history)
        width = 2 if last else 1
        curve = fit['offset'] + ramps @ torch.tensor(fit['heights'], dtype=torch.float64)
        label = 'fitted F~(t)' if last else None
        ax.plot(grid.numpy(), curve.numpy(), color='tab:blue', alpha=alpha, linewidth=width, label=label)
        if 'masses' in fit:
            curve_warp = TimeWarp(warp.t_min, warp.t_max, n_bins=warp.n_bins)
            curve_warp.masses = torch.tensor(fit['masses'], dtype=torch.float64)
            label = f'batch {fit["batch"]}' if 'batch' in fit and (last or age == 0) else None
            density = grid * curve_warp.density(grid)
            ax_density.plot(
                grid.numpy(), density.numpy(), color='tab:red', alpha=alpha, linewidth=width, label=label
            )
    ax.set_xscale('log')
    ax.set_xlabel('t (noise std)')
    ax.set_ylabel('cross-entropy (nats)')
    ax.set_title(f'time warp {title}'.strip())
    ax.legend(loc='lower right')
    ax_density.set_xscale('log')
    ax_density.set_xlabel('t (noise std)')
    ax_density.set_ylabel("training density of t per unit ln t: t F'(t)")
    ax_density.set_title(f'where training samples t ({warp.quantile(0.5):.1f} = median)')
    ax_density.legend(loc='upper right')
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
