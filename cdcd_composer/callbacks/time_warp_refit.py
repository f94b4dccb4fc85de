"""Refitting the time warp during training (paper §3.3), as a Composer Callback."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist
from PIL import Image

from cdcd_composer.composer_model import unwrap_model
from cdcd_composer.plotting import plot_time_warp
from cdcd_composer.time_warping import FitReport, TimeWarp

log = logging.getLogger(__name__)

BUFFER_ROWS_MEANING = "t, per-sequence CE, F'(t) under the curve t was drawn from, share of given tokens"
BUFFER_ROWS = 4  # BUFFER_ROWS_MEANING
MASS_LEVELS = (3.0, 10.0, 30.0, 100.0)  # noise stds whose training mass below is logged at each refit


class TimeWarpRefit(Callback):
    """Fits the time warp to (t, per-sequence CE) pairs from training and installs it (paper §3.3).

    Every batch the pairs of all ranks (with F'(t) and the share of given tokens, the fit's
    control variate) are all-gathered into a fixed-size ring buffer (so every
    rank holds the same buffer); every `interval` the curve is refitted from that buffer. The
    fit is deterministic given its data, so all ranks install bit-identical curves. The curve,
    the buffer and the fit count are checkpointed as fixed-shape tensors and restored on resume.

    Args:
        interval: Refit period, a Composer time string ('200ba').
        buffer_size: Most recent pairs kept for the fit (across all ranks).
        min_points: Fewest pairs for a fit (default: 2 per bin).
        plot_folder: Folder for `time_warp.png` (formatted with `{run_name}`); None disables it.
        history: Number of earlier fits drawn (fainter) in the figure.
        **warp_settings: The curve's settings, passed to `TimeWarp` (n_bins, mu, temperature,
            shape, max_weight, min_evidence, update_rate, min_group_points); its noise range
            is the model's.
    """

    warp_settings_of = TimeWarp  # The registry checks YAML keys against both signatures.

    def __init__(
        self,
        interval: str = '200ba',
        buffer_size: int = 4096,
        min_points: int | None = None,
        plot_folder: str | None = '{run_name}',
        history: int = 5,
        **warp_settings: Any,
    ) -> None:
        n_bins = TimeWarp(**warp_settings).n_bins  # Fails on bad settings now, not at the first refit.
        if buffer_size < 2 * n_bins:
            raise ValueError(
                f'callbacks.time_warp_refit.buffer_size={buffer_size} must be at least 2 * n_bins'
            )
        self.interval = interval
        self._should_refit = create_interval_scheduler(interval, checkpoint_events=False)
        self.warp_kwargs = warp_settings
        self.min_points = min_points
        self.plot_folder = plot_folder
        self.history_size = history
        self.warp: TimeWarp | None = None
        # rows: t, CE, F'(t), share of given tokens
        self.buffer = torch.full((BUFFER_ROWS, buffer_size), float('nan'), dtype=torch.float64)
        self.n_seen = 0  # Pairs ever appended; the write position is n_seen % buffer_size.
        self.fit_count = 0
        self.rejected_count = 0
        self.history: list[dict[str, Any]] = []
        self._pending: list[torch.Tensor] = []

    # -- events ----------------------------------------------------------------------------
    def init(self, state: State, logger: Logger) -> None:
        """Installs a uniform warp with these settings over the model's noise range.

        INIT comes before a checkpoint is loaded, so a resumed run loads its curve into this
        warp, which lives in the model's state dict.
        """
        model = unwrap_model(state.model)
        self.warp = TimeWarp(model.spec.t_min, model.spec.t_max, **self.warp_kwargs)
        model.time_warp = self.warp

    def after_forward(self, state: State, logger: Logger) -> None:
        """Keeps this microbatch's (t, CE, F'(t), given share) columns until the batch ends."""
        outputs = state.outputs
        if not isinstance(outputs, dict) or 'ce_per_sequence' not in outputs:
            return
        # Stays on the device: copying to the host here would sync every step.
        t = outputs['t'].detach().double()
        density = self.warp.density(t) if self.warp is not None else torch.ones_like(t)
        share = outputs.get('given_share', torch.zeros_like(t)).detach().double()
        self._pending.append(torch.stack([t, outputs['ce_per_sequence'].detach().double(), density, share]))

    def batch_end(self, state: State, logger: Logger) -> None:
        """Gathers the batch's pairs from every rank into the buffer; refits when the interval says so."""
        if self._pending:
            local = torch.cat(self._pending, dim=1)
            self._pending = []
            self._append(self._all_gather(local, state))
        if self._should_refit(state, Event.BATCH_END):
            self.refit(state, logger)

    def _all_gather(self, local: torch.Tensor, state: State) -> torch.Tensor:
        if dist.get_world_size() == 1:
            return local
        device = state.device.tensor_to_device(local)  # gloo gathers CPU tensors, NCCL device tensors
        return torch.cat(dist.all_gather(device), dim=1)

    def _append(self, triples: torch.Tensor) -> None:
        """Writes (4, n) columns into the ring buffer, which lives on their device between refits."""
        if self.buffer.device != triples.device:
            self.buffer = self.buffer.to(triples.device)
        capacity = self.buffer.shape[1]
        triples = triples[:, -capacity:]
        index = (self.n_seen + torch.arange(triples.shape[1], device=triples.device)) % capacity
        self.buffer[:, index] = triples
        self.n_seen += triples.shape[1]

    def refit(self, state: State, logger: Logger) -> None:
        """Fits the model's curve to the buffer and logs its summary (and the figure).

        A rejected fit is logged as a warning with its reason and counted in
        `time_warp/rejected_count`; the previous curve stays.
        """
        assert self.warp is not None  # Set at INIT.
        start = time.perf_counter()
        filled = self.buffer[:, : min(self.n_seen, self.buffer.shape[1])].cpu()  # the one copy per refit
        report = self.warp.fit(
            filled[0], filled[1], density=filled[2], min_points=self.min_points, covariate=filled[3]
        )
        seconds = time.perf_counter() - start
        if report.accepted:
            self._accepted(state, logger, filled, report, seconds)
        else:
            self._rejected(state, logger, filled, report)

    def _rejected(self, state: State, logger: Logger, filled: torch.Tensor, report: FitReport) -> None:
        """Counts, logs and (rank 0) plots a rejected fit; the previous curve stays."""
        batch = int(state.timestamp.batch)
        self.rejected_count += 1
        log.warning(
            'time warp refit rejected at batch %d (%d of %d refits): %s; keeping the previous curve',
            batch,
            self.rejected_count,
            self.rejected_count + self.fit_count,
            report.reason,
        )
        logger.log_metrics(
            {
                'time_warp/accepted': 0.0,
                'time_warp/rejected_count': float(self.rejected_count),
                'time_warp/evidence': report.evidence,
                **self._mass_below(),
            }
        )
        if dist.get_global_rank() == 0:  # The figure shows the data the fit found no curve in.
            self._plot(state, logger, filled, f'rejected: chi-square {report.evidence:.1f}')

    def _accepted(
        self, state: State, logger: Logger, filled: torch.Tensor, report: FitReport, seconds: float
    ) -> None:
        """Records an installed fit in the history, logs its summary and (rank 0) plots it."""
        batch = int(state.timestamp.batch)
        self.fit_count += 1
        self.history = (
            self.history
            + [
                {
                    'batch': batch,
                    'offset': self.warp.fit_offset,
                    'heights': self.warp.fit_heights.tolist(),
                    'masses': self.warp.masses.tolist(),
                }
            ]
        )[-self.history_size :]
        summary = {
            'time_warp/accepted': 1.0,
            'time_warp/fit_count': float(self.fit_count),
            'time_warp/rejected_count': float(self.rejected_count),
            'time_warp/median_t': self.warp.quantile(0.5),
            'time_warp/t10': self.warp.quantile(0.1),
            'time_warp/t90': self.warp.quantile(0.9),
            'time_warp/residual': report.residual,
            'time_warp/explained': report.explained,
            'time_warp/evidence': report.evidence,
            'time_warp/change': report.change,
            'time_warp/covariate_slope': report.covariate_slope,
            'time_warp/refit_seconds': seconds,
        }
        summary |= self._mass_below()
        logger.log_metrics(summary)
        log.info('time warp refit %d on %d pairs: %s', self.fit_count, report.n_points, summary)
        if dist.get_global_rank() == 0:
            self._plot(state, logger, filled)

    def _mass_below(self) -> dict[str, float]:
        """Where the training mass of the curve in use sits: F(t) at a few t, as scalars any logger plots."""
        assert self.warp is not None
        levels = [t for t in MASS_LEVELS if self.warp.t_min < t < self.warp.t_max]
        below = self.warp.cdf(torch.tensor(levels, dtype=torch.float64)).tolist()
        return {f'time_warp/mass_below_t{t:g}': mass for t, mass in zip(levels, below)}

    def _plot(self, state: State, logger: Logger, filled: torch.Tensor, note: str = '') -> None:
        title = f'batch {int(state.timestamp.batch)}' + (f', {note}' if note else '')
        image = plot_time_warp(self.warp, filled[0], filled[1], self.history, title=title)
        logger.log_images(image, name='time_warp', channels_last=True)
        if self.plot_folder is not None:
            folder = self.plot_folder.format(run_name=state.run_name)
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, 'time_warp.png'))

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Buffer and counters, as fixed-shape tensors and scalars (the curve is the model's)."""
        return {
            'buffer': self.buffer.cpu().clone(),
            'n_seen': self.n_seen,
            'fit_count': self.fit_count,
            'rejected_count': self.rejected_count,
            # One JSON string, not a list: sharded (DCP) checkpoints need the same keys every time.
            'history': json.dumps(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the buffer and the counters."""
        if state['buffer'].shape[0] != BUFFER_ROWS:
            raise ValueError(
                f'checkpointed time warp buffer has {state["buffer"].shape[0]} rows, not {BUFFER_ROWS} '
                f'({BUFFER_ROWS_MEANING}): it is not from this version of TimeWarpRefit; start afresh'
            )
        if state['buffer'].shape != self.buffer.shape:
            raise ValueError(
                f'checkpointed time warp buffer has {state["buffer"].shape[1]} slots, config has '
                f'{self.buffer.shape[1]}; set the same buffer_size'
            )
        self.buffer = state['buffer'].double().clone()
        self.n_seen = int(state['n_seen'])
        self.fit_count = int(state['fit_count'])
        self.rejected_count = int(state['rejected_count'])
        self.history = json.loads(state['history'])
