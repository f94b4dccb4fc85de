"""Flow-map distillation of a teacher's sampler into a few-step student, as a Composer Algorithm.

The teacher's own sampler (its default solver, DPM-Solver++(2M) over its `teacher_steps` warped
steps, at the distillation's score temperature) integrates the probability-flow ODE from each
training sample's noise; the student learns the jumps of that trajectory. A student pass reads
the time t it is at and the time s it lands at (`CDCDConfig.target_time`), and its x0_hat takes
the exponential step there, x_s = x0_hat + (s/t)^(1/tau) (x_t - x0_hat) (`sampler._distilled`).
For a jump between two of the teacher's states the target is the x0_hat that makes that step
land exactly on the teacher's state at s (`jump_target`, a mean-squared error); a jump to the
end is the sample itself: the cross-entropy of the teacher's sampled tokens. One student serves
several step counts: the pass times of each count are spaced along the teacher's steps (`pass_indices`),
and every jump of every count is trained (TRACT's and the flow-map models' multi-step jumps,
taught by one teacher in one round; docs/ablations.md has the method's choice).

Everything a trajectory draws (its noise, its conditioning mask, which jumps a row trains) is a
function of (seed, epoch, sample index), as the rest of the corruption (`sample_draws`): the same
run on any number of ranks, and resumed, trains on the same rows.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from cdcd_composer import sample_draws
from cdcd_composer.composer_model import CDCDComposerModel, unwrap_model
from cdcd_composer.data.loaders import HOST_INDEX
from cdcd_composer.diffusion import data_difference
from cdcd_composer.masking import sample_generate_mask
from cdcd_composer.sampler import DEFAULT_SOLVER, DEFAULT_STEPS, DISTILLED, TAU_RANGE, SamplerSettings, sample

log = logging.getLogger(__name__)
# Keys of a distillation batch row besides the data's: the teacher's state the pass starts from,
# the time it lands at, and for a jump between states the x0_hat that lands on the teacher's.
X_T, T_NEXT, JUMP_TARGET, LANDS = 'x_t', 't_next', 'jump_target', 'lands_between_states'


def pass_indices(teacher_steps: int, evaluations: int, spacing: float = 1.0) -> list[int]:
    """Where a student of `evaluations` passes starts each, as indices of the teacher's steps, plus the end.

    Pass i starts at round(teacher_steps (1 - (1 - i/k)^spacing)): evenly spaced along the teacher's
    steps at spacing 1, the last passes closer together above (24 steps, 4 passes: spacing 1.5, the
    recipe's, [0, 8, 16, 21, 24]; spacing 2.5, [0, 12, 20, 23, 24]). Where rounding would start two
    passes at one step, or the last at the teacher's end, the later passes are packed onto the steps
    just before the end, one each (8 passes at spacing 2.5: [0, 7, 12, 17, 20, 21, 22, 23, 24]).
    `evaluations` <= `teacher_steps`.
    """
    starts = [round(teacher_steps * (1 - (1 - i / evaluations) ** spacing)) for i in range(evaluations)]
    latest = teacher_steps
    for i in reversed(range(evaluations)):
        starts[i] = latest = min(starts[i], latest - 1)
    return [*starts, teacher_steps]


def jumps(teacher_steps: int, evaluations: Sequence[int], spacing: float = 1.0) -> list[tuple[int, int]]:
    """Every (start, landing) pair of teacher-step indices that a student of these counts takes."""
    pairs = set()
    for count in evaluations:
        idx = pass_indices(teacher_steps, count, spacing)
        pairs.update(zip(idx[:-1], idx[1:]))
    return sorted(pairs)


def jump_target(
    x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor, tau: float
) -> torch.Tensor:
    """The x0_hat whose exponential step from (x_t, t) lands on x_s at s: (x_s - rho x_t) / (1 - rho).

    rho = (s/t)^(1/tau) (the sampler's step, `sampler._distilled`); t, s: (B,).
    """
    rho = ((s / t) ** (1.0 / tau))[:, None, None]
    return (x_s - rho * x_t) / (1.0 - rho)


class Distillation(Algorithm):
    """Trains the run's model (a student, `model.target_time`) on its teacher's sampling trajectories.

    At AFTER_DATALOADER each sample of the device batch becomes `states_per_trajectory` rows: the
    teacher samples once from the sample's own noise (with the sample's tokens given where its
    conditioning mask gives them: prompts and infilling are distilled too), and each row takes one
    jump of the student's counts, drawn uniformly. The rows replace the batch; the model's loss
    then reads the keys named above (`CDCDComposerModel.forward`). Self-conditioning, EMA and
    everything else run on the rows as on any batch.

    Args:
        teacher: The teacher's export or checkpoint (local or object store); `train.py` builds the
            student from it (same architecture, plus the landing-time embedding) and its weights.
        evaluations: The network evaluations per sample the student is distilled for.
        default_evaluations: The count its export samples with by default (one of `evaluations`).
        tau: The score temperature of the teacher's trajectories; the student samples at it.
        teacher_steps: The teacher solver's steps (its default: 24, 25 network evaluations).
        spacing: Where the passes start along the teacher's steps (`pass_indices`): 1 evenly, above
            1 the last passes closer together, where the sample's last tokens are decided.
        states_per_trajectory: Rows per sample: jumps of one teacher trajectory trained together.
        jump_weight: Weight of the jumps' mean-squared error (per embedding dimension) against the
            cross-entropy of the jumps to the end.
        weights: The teacher's 'ema' or 'raw' weights.
    """

    def __init__(
        self,
        teacher: str,
        evaluations: Sequence[int] = (1, 2, 4, 8),
        default_evaluations: int = 4,
        tau: float = 0.7,
        teacher_steps: int = DEFAULT_STEPS,
        spacing: float = 1.0,
        states_per_trajectory: int = 4,
        jump_weight: float = 20.0,
        weights: str = 'ema',
    ) -> None:
        for name, count in (
            ('states_per_trajectory', states_per_trajectory),
            ('teacher_steps', teacher_steps),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f'algorithms.distillation.{name}={count!r} must be a positive integer')
        counts = list(evaluations)
        if not counts or any(
            isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= teacher_steps for c in counts
        ):
            raise ValueError(
                f'algorithms.distillation.evaluations={evaluations!r} must list counts in '
                f'[1, teacher_steps={teacher_steps}]'
            )
        if default_evaluations not in counts:
            raise ValueError(
                f'algorithms.distillation.default_evaluations={default_evaluations} must be one of '
                f'evaluations {counts}'
            )
        if not TAU_RANGE[0] <= tau <= TAU_RANGE[1]:
            raise ValueError(
                f'algorithms.distillation.tau={tau} must lie in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}]'
            )
        if not 0 < jump_weight < math.inf:
            raise ValueError(
                f'algorithms.distillation.jump_weight={jump_weight} must be a positive finite number'
            )
        self.teacher_path, self.weights = teacher, weights
        self.evaluations, self.default_evaluations = sorted(set(counts)), default_evaluations
        self.tau, self.teacher_steps = float(tau), teacher_steps
        self.states_per_trajectory, self.jump_weight = states_per_trajectory, float(jump_weight)
        if not 0 < spacing < math.inf:
            raise ValueError(f'algorithms.distillation.spacing={spacing} must be a positive finite number')
        self.spacing = float(spacing)
        self.jumps = torch.tensor(jumps(teacher_steps, self.evaluations, self.spacing))  # (J, 2)
        self._teacher: CDCDComposerModel | None = None

    def teacher(self) -> CDCDComposerModel:
        """The teacher (loaded once, in eval mode, on the CPU until the run moves it)."""
        if self._teacher is None:
            from cdcd_composer.checkpoints.loading import load_trained_model  # noqa: PLC0415 (a cycle)

            self._teacher = load_trained_model(self.teacher_path, weights=self.weights)
        return self._teacher

    def teacher_times(self) -> torch.Tensor:
        """The teacher solver's times (teacher_steps + 1,), float64: its fitted warp's."""
        return self.teacher().time_warp.sampling_timesteps(self.teacher_steps)

    def sampling_record(self) -> dict[str, Any]:
        """What the student's spec records: its solver, temperature, default count and each count's times."""
        times = self.teacher_times().tolist()
        schedules = {
            str(c): [times[i] for i in pass_indices(self.teacher_steps, c, self.spacing)]
            for c in self.evaluations
        }
        return {
            'solver': DISTILLED,
            'tau': self.tau,
            'steps': self.default_evaluations,
            'timesteps': schedules,
        }

    def init_student(self, student: CDCDComposerModel) -> None:
        """Makes the run's fresh model the teacher's student: its weights, warp and sampling record.

        Raises:
            ValueError: one line naming what of the student's config or data is not the teacher's.
        """
        teacher, where = self.teacher(), f'the teacher {self.teacher_path}'
        if not student.config.target_time:
            raise ValueError(
                'a distillation trains a student: set model.target_time=true (the landing time it reads)'
            )
        own = dataclasses.replace(student.config, target_time=False)
        differs = [
            f.name for f in dataclasses.fields(own) if getattr(own, f.name) != getattr(teacher.config, f.name)
        ]
        if differs:
            keys = ', '.join(f'model.{k}={getattr(teacher.config, k)!r}' for k in differs)
            raise ValueError(f"the student's architecture must be {where}'s: set {keys}")
        if (student.spec.t_min, student.spec.t_max) != (teacher.spec.t_min, teacher.spec.t_max):
            raise ValueError(
                f'diffusion.t_min/t_max must be those of {where}: '
                f'{teacher.spec.t_min:g} and {teacher.spec.t_max:g}'
            )
        differs = data_difference(teacher.spec, student.spec)
        if differs:
            raise ValueError(
                f'data.root holds data with {differs} than {where} was trained on; distil on its data'
            )
        missing, unexpected = student.model.load_state_dict(teacher.model.state_dict(), strict=False)
        if unexpected or any(not k.startswith('target_time_embedding.') for k in missing):
            raise ValueError(
                f'{where} does not load into the student (missing {missing}, unexpected {unexpected})'
            )
        student.time_warp = copy.deepcopy(teacher.time_warp)
        student.spec = dataclasses.replace(student.spec, sampling=self.sampling_record())

    def match(self, event: Event, state: State) -> bool:
        """At INIT (the loss's weight) and after each batch is loaded."""
        return event in (Event.INIT, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        """Registers the jump weight, or replaces the batch with its distillation rows."""
        model = unwrap_model(state.model)
        if event == Event.INIT:
            model.jump_weight = self.jump_weight
            # Every row costs the teacher's passes over its trajectory, shared by the sample's rows.
            model.extra_forward_fraction += (self.teacher_steps + 1) / self.states_per_trajectory
            return
        batch = state.device.batch_to_device(state.batch)
        draws = sample_draws.SampleDraws(state.rank_zero_seed, int(state.timestamp.epoch), batch['index'])
        state.batch = self.rows(model, batch, draws)

    @torch.no_grad()
    def rows(
        self, model: CDCDComposerModel, batch: dict[str, Any], draws: sample_draws.SampleDraws
    ) -> dict[str, Any]:
        """The distillation rows of a batch (on its device): `states_per_trajectory` per sample."""
        tokens, teacher = batch['tokens'], self.teacher().to(batch['tokens'].device)
        (size, length), width, per = tokens.shape, model.config.d_embed, self.states_per_trajectory
        mask = torch.ones_like(tokens, dtype=torch.bool)
        if model.masking is not None:
            mask = sample_generate_mask(tokens, model.pad_id, model.masking, draws.columns(sample_draws.MASK))
        noise = draws.normal(sample_draws.TRAJECTORY, length * width).view(size, length, width)
        pair = (draws.uniform(sample_draws.JUMP, per) * len(self.jumps)).long().clamp_max(len(self.jumps) - 1)
        start, land = self.jumps.to(tokens.device)[pair].unbind(-1)  # (B, per) each
        x_t, x_s = noise.new_zeros(2, size, per, length, width)

        def keep(i: int, x: torch.Tensor) -> None:  # the teacher's state at its step i
            x_t.copy_(torch.where((start == i)[..., None, None], x[:, None], x_t))
            x_s.copy_(torch.where((land == i)[..., None, None], x[:, None], x_s))

        settings = SamplerSettings(
            solver=DEFAULT_SOLVER, tau=self.tau, self_conditioning=teacher.spec.self_conditioned
        )
        times = self.teacher_times().to(tokens.device, torch.float32)
        ends = sample(teacher.model, times, size, length, settings, given_tokens=tokens, generate_mask=mask,
                      noise=noise, on_state=keep)  # fmt: skip
        t, s = times[start].flatten(), times[land].flatten()
        lands = (land < self.teacher_steps).flatten()
        x_t, x_s = x_t.flatten(0, 1), x_s.flatten(0, 1)
        repeat = lambda v: v.repeat_interleave(per, 0)  # noqa: E731
        # Each row's own index (sample * per + row), kept on the host too (the self-conditioning coin).
        host = [i * per + k for i in batch[HOST_INDEX] for k in range(per)]
        return {
            'tokens': repeat(ends), 'index': torch.tensor(host, device=tokens.device), HOST_INDEX: host,
            'generate_mask': repeat(mask),
            't': t, T_NEXT: s, X_T: x_t, LANDS: lands,
            JUMP_TARGET: torch.where(lands[:, None, None], jump_target(x_t, x_s, t, s, self.tau), 0.0),
        }  # fmt: skip
