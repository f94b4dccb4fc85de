"""Draws docs/figures/time_warp_t300_masked.png: the warp learning from uniform at t_max = 300.

    python docs/time_warp_figure.py

Ten refits on a reproduction of per-sequence losses under conditioning masks (the CE
curve measured on a GPU at t_max = 300, scaled by the share of given tokens, plus noise), each on
64 batches of 256 sequences drawn from the current curve, as `TimeWarpRefit` collects them.
"""

from __future__ import annotations

import os
import sys

import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]

from test_time_warping import masked_cdcd_loss  # noqa: E402

from cdcd_composer.plotting import plot_time_warp  # noqa: E402
from cdcd_composer.time_warping import TimeWarp  # noqa: E402


def main() -> None:
    """Runs the refits and writes the figure."""
    generator = torch.Generator().manual_seed(0)
    warp, history = TimeWarp(1.0, 300.0), []
    for refit in range(1, 11):
        t = torch.cat([warp.sample_t(256, generator=generator) for _ in range(64)]).double()
        loss, given = masked_cdcd_loss(t, generator)
        report = warp.fit(t, loss, covariate=given)
        history.append({'batch': 200 * refit, 'offset': warp.fit_offset, 'heights': warp.fit_heights.tolist(),
                        'masses': warp.masses.tolist()})  # fmt: skip
        below = float(warp.cdf(torch.tensor([30.0]))[0])
        print(f'refit {refit}: accepted={report.accepted} chi-square={report.evidence:.0f}', end=' ')
        print(f'mass below t=30: {below:.3f}')
    image = plot_time_warp(warp, t, loss, history[::2], title='synthetic masked losses, t_max = 300')
    out = os.path.join(REPO, 'docs', 'figures', 'time_warp_t300_masked.png')
    Image.fromarray(image).save(out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
