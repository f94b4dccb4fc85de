"""Figures: the entropy-vs-t curve of time warping (paper Fig. 2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cdcd_composer.time_warping import TimeWarp


def plot_time_warp(
    warp: TimeWarp, t: torch.Tensor, loss: torch.Tensor, history: list[dict[str, Any]], title: str = ''
) -> np.ndarray:
    """Scatter of recent (t, CE) pairs, the fitted F~(t) and fainter earlier fits.

    Args:
        warp: The current curve (its last fit is drawn boldest).
        t: (n,) noise levels of the recent pairs.
        loss: (n,) their per-sequence cross-entropy, nats.
        history: Earlier fits as {'offset': float, 'heights': list[float]}, oldest first.
        title: Figure title.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter(t.numpy(), loss.numpy(), s=2, alpha=0.25, color='tab:gray', label='recent (t, CE)')
    grid = torch.logspace(np.log10(warp.t_min), np.log10(warp.t_max), 400, dtype=torch.float64)
    ramps = warp._ramps(warp._unit(grid))
    for age, fit in enumerate(history):
        curve = fit['offset'] + ramps @ torch.tensor(fit['heights'], dtype=torch.float64)
        last = age == len(history) - 1
        alpha = 1.0 if last else 0.15 + 0.5 * age / len(history)
        label = 'fitted F~(t)' if last else None
        width = 2 if last else 1
        ax.plot(grid.numpy(), curve.numpy(), color='tab:blue', alpha=alpha, linewidth=width, label=label)
    ax.set_xscale('log')
    ax.set_xlabel('t (noise std)')
    ax.set_ylabel('cross-entropy (nats)')
    ax.set_title(f'time warp {title}'.strip())
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
