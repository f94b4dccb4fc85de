"""Sampling: the probability-flow ODE with score interpolation (§6.1), and decoding to text.

With x0_hat = softmax(logits) @ E the ODE is dx/dt = (x - x0_hat) / (tau t). Solvers (`SOLVERS`):
- 'euler' (the paper's) and 'heun' (EDM's trapezoidal 2nd order): steps of that direction;
- 'exponential': the exact solution for x0_hat held fixed over a step,
  x' = x0_hat + (t'/t)^(1/tau) (x - x0_hat) (DDIM's step for the variance-exploding process);
- 'dpmpp_2m' (the default): DPM-Solver++(2M) in log t: x0_hat extrapolated linearly in log t
  from this step's and the previous step's estimates, integrated exactly against the
  (t'/t)^(1/tau) kernel;
- 'distilled': a distilled student's steps (`algorithms/distillation.py`): pass i reads where it
  lands, t_(i+1), and its x0_hat takes the exponential step there, landing where the teacher's
  solver would; the last pass's argmax is the sample. Its times are the ones it was distilled
  for, recorded in its spec (`distilled_timesteps`); one network evaluation per step.
Where every solver step evaluates the denoiser is one setting, `eval_time` (the final argmax
pass stays at t_min): 'C' evaluates at C t instead of t, the time-shifted evaluation that
corrects few-step samplers' exposure bias (Li et al. 2024, "Alleviating exposure bias in diffusion
models through sampling with shifted time steps"; Ning et al. 2023, epsilon scaling). It is
neutral (c = 1) unless asked for: the best c depends on the model (1.15 on the demo model,
docs/ablations.md), so no constant tuned on one model applies to all. The default sampler,
'dpmpp_2m' with 24 steps, reaches within about a point of 200 Euler steps' recognised sentences
on the demo model in 25 network evaluations instead of 201.
Prompts, infilling, classifier-free guidance and self-conditioning work with every solver.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from cdcd_composer.model import CDCDTransformer, DenoiserOutput, score
from cdcd_composer.solver_names import DEFAULT_SOLVER, DEFAULT_STEPS, DISTILLED, ODE_SOLVERS, SOLVERS  # noqa: F401

log = logging.getLogger(__name__)
MAX_SAMPLING_STEPS = 100_000
MAX_SAMPLES = 100_000_000  # per call: larger requests are batched and announced up to here, then refused
# Settings that give samples: on the demo model tau 1e-6 still samples and 1e-300 gives empty
# canvases (the multistep coefficients overflow); guidance 1e6 still samples, degenerate from ~100.
TAU_RANGE, MAX_GUIDANCE = (1e-3, 100.0), 100.0  # per call: a day of sampling for cdcd-140m on one GPU
SAMPLING_MEMORY = 2 << 30  # bytes of activations per solver batch when no batch_size is given


def parse_eval_time(value: str | float) -> tuple[float, float | None]:
    """(scale, shift) of an `eval_time`: 'C' evaluates at C t (shift None), 'next+D' at t_next + D.

    Raises:
        ValueError: one line naming `--eval_time` and its two forms.
    """
    text = str(value).strip()
    shifted = text.startswith('next+')
    try:
        amount = float(text.removeprefix('next+'))
    except ValueError:
        amount = math.nan
    if shifted and 0 <= amount < math.inf:  # NaN fails every comparison
        return 1.0, amount
    if not shifted and 0 < amount < math.inf:
        return amount, None
    raise ValueError(
        f'--eval_time {text!r} must be C, a positive number (the model at C t), or next+D with D >= 0 '
        "(at the next step's time + D)"
    )


@dataclass(frozen=True)
class SamplerSettings:
    """How to integrate the ODE.

    Attributes:
        solver: One of `SOLVERS` (see the module docstring).
        tau: The score temperature; below 1 trades entropy for likelihood (§6.4).
        initial_noise_scale: s_init; x starts from N(0, (s_init * t_max)^2 I).
        guidance: g of classifier-free guidance,
            x0_hat = x0_hat(unconditional) + g * (x0_hat(conditional) - x0_hat(unconditional)).
            At 1 (or with nothing given) the unconditional pass is never computed.
        self_conditioning: Feed the latest x0_hat back as the self-conditioning input.
        eval_time: Where step i (from t_i to t_{i+1}) evaluates the model: 'C' (or a number) at
            C t_i (exposure-bias correction; '1', the default, is the paper's t_i), or 'next+D' at
            t_{i+1} + D (the asymmetric time shift of char-diffusion and Analog Bits; Euler only).
            Kept in its canonical form ('1.15', 'next+0.1').
    """

    solver: str = DEFAULT_SOLVER
    tau: float = 1.0
    initial_noise_scale: float = 1.0
    guidance: float = 1.0
    self_conditioning: bool = False
    eval_time: str | float = '1'

    def __post_init__(self) -> None:
        if not isinstance(self.self_conditioning, bool):
            raise ValueError(f'self_conditioning must be True or False, got {self.self_conditioning!r}')
        if self.solver not in SOLVERS:
            raise ValueError(f'solver (--solver) {self.solver!r} must be one of {", ".join(SOLVERS)}')
        scale, shift = parse_eval_time(self.eval_time)
        object.__setattr__(self, 'eval_time', f'next+{shift:g}' if shift is not None else f'{scale:g}')
        object.__setattr__(self, '_where', (scale, shift))
        if self.solver == DISTILLED and self.eval_time != '1':
            raise ValueError('--eval_time does not apply to a distilled student (it reads its own times)')
        if shift is not None and self.solver != 'euler':
            raise ValueError(f'--eval_time {self.eval_time} (at the next time) works with Euler steps only')
        # `not x > 0` rather than `x <= 0`: NaN fails every comparison and must be refused too.
        if not TAU_RANGE[0] <= self.tau <= TAU_RANGE[1]:  # NaN fails too
            raise ValueError(
                f'score temperature (--tau) must lie in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}], got '
                f'{self.tau} (below, exp(-h / tau) underflows and samples come out empty)'
            )
        if not 0 < self.initial_noise_scale < math.inf:
            raise ValueError(
                f'initial noise scale (--initial_noise_scale) must be a positive finite number, got '
                f'{self.initial_noise_scale}'
            )
        if not abs(self.guidance) <= MAX_GUIDANCE:
            raise ValueError(
                f'guidance scale (--guidance) must lie in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}] (1: none), '
                f'got {self.guidance}'
            )

    def model_time(self, t: torch.Tensor, t_next: torch.Tensor | None = None) -> torch.Tensor:
        """Where a step from t (to t_next) evaluates the denoiser (`eval_time`)."""
        scale, shift = self._where
        return scale * t if shift is None else t_next + shift

    def evaluated_at(self) -> str:
        """`eval_time` in words: '1.15 t', 't_next + 0.1'."""
        scale, shift = self._where
        return f'{scale:g} t' if shift is None else f't_next + {shift:g}'


def check_solver_fits(model: CDCDTransformer, settings: SamplerSettings) -> None:
    """A distilled student samples with its own steps (`distilled`), and only a student does.

    Raises:
        ValueError: one line naming what the model is and the solver asked for.
    """
    if (settings.solver == DISTILLED) != bool(model.config.target_time):
        raise ValueError(
            'a distilled student samples with its own steps (solver distilled), and only a distilled student '
            f'does; it is {"" if model.config.target_time else "not "}one, the solver {settings.solver}'
        )


@torch.no_grad()
def sample(
    model: CDCDTransformer,
    timesteps: torch.Tensor,
    num_samples: int,
    seq_len: int,
    settings: SamplerSettings | None = None,
    *,
    given_tokens: torch.Tensor | None = None,
    generate_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
    noise: torch.Tensor | None = None,
    on_state: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrates the probability-flow ODE from t_max to t_min, then takes the argmax.

    With x0_hat = softmax(logits) @ E, the score is s = (x0_hat - x) / t^2 (score interpolation,
    `score`) and the ODE's direction d(x, t) = -t s / tau, integrated by `settings.solver`.
    Given tokens (`generate_mask` 0) enter the model clean at every step and are returned as is.

    Args:
        model: The denoiser (in eval mode).
        timesteps: (n_steps + 1,) decreasing noise levels, first t_max, last t_min.
        num_samples: Batch size B.
        seq_len: Canvas length L.
        settings: Solver, temperature, guidance, self-conditioning.
        given_tokens: (B, L) token ids kept where `generate_mask` is 0 (prompts, infilling).
        generate_mask: (B, L) 1 where tokens are generated; default all ones.
        generator: Random generator for the initial noise (determinism by seed); on the model's device.
        on_step: Called with the step index after each step (progress bars).
        noise: (B, L, d_embed) standard normal draws to start from, instead of `generator`'s.
        on_state: Called with (i, x) before each ODE step i, x at timesteps[i], and with
            (n_steps, x) for the state the argmax pass reads (a distillation's trajectories).

    Returns:
        (B, L) int64 token ids.
    """
    device = next(model.parameters()).device
    timesteps = timesteps.to(device=device, dtype=torch.float32)
    if generate_mask is None:
        generate_mask = torch.ones(num_samples, seq_len, dtype=torch.bool, device=device)
    generate_mask = generate_mask.to(device=device, dtype=torch.bool)
    if given_tokens is None:
        given_tokens = torch.zeros(num_samples, seq_len, dtype=torch.long, device=device)
    given_tokens = given_tokens.to(device)
    settings = settings or SamplerSettings()
    check_solver_fits(model, settings)
    denoiser = _Denoiser(model, given_tokens, generate_mask, settings, on_state)
    if noise is None:
        noise = torch.randn(num_samples, seq_len, model.config.d_embed, generator=generator, device=device)
    x = noise * timesteps[0] * settings.initial_noise_scale
    if settings.solver == DISTILLED:
        logits = _distilled(denoiser, x, timesteps, settings, on_step)
    else:
        solve = _euler_or_heun if settings.solver in ('euler', 'heun') else _exponential_integrator
        x = solve(denoiser, x, timesteps, settings, on_step)
        logits = denoiser.logits(x, timesteps[-1])
    return torch.where(generate_mask, logits.argmax(-1), given_tokens)


def sample_in_batches(
    model: CDCDTransformer,
    timesteps: torch.Tensor,
    num_samples: int,
    seq_len: int,
    settings: SamplerSettings,
    *,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """`sample` over batches of at most `batch_size`; batch `i` (from sample `i`) draws with seed + i.

    The one path from a request to token ids: `CDCDComposerModel.generate_tokens` (generate.py,
    eval.py) and the Hugging Face model's `generate` both sample through it.

    Args:
        model: The denoiser (in eval mode).
        timesteps: (n_steps + 1,) decreasing noise levels, first t_max, last t_min.
        num_samples: How many sequences N.
        seq_len: Canvas length L.
        settings: Solver, temperature, guidance, self-conditioning.
        given: Per-sample conditioning (given_tokens, generate_mask), each (N, L), or None.
        seed: Batch `i` (starting at sample `i`) draws its initial noise with seed + i.
        batch_size: Samples per solver batch (default: as many as fit `SAMPLING_MEMORY`).
        on_step: Called after each solver step of each batch (progress bars).

    Returns:
        (num_samples, seq_len) int64 token ids.
    """
    check_sampling_request(num_samples, len(timesteps) - 1, seed, batch_size)
    device = next(model.parameters()).device
    batch_size = batch_size or sampling_batch_size(model.config.vocab_size, model.config.d_model, seq_len)
    batches = -(-num_samples // batch_size)
    if batches > 1:  # a long job says so before it starts (generate.py prints its own line)
        log.info('sampling %d samples in %d batches of at most %d', num_samples, batches, batch_size)
    rows = []
    for i in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - i)
        conditioning = (
            {}
            if given is None
            else {'given_tokens': given[0][i : i + count], 'generate_mask': given[1][i : i + count]}
        )
        generator = torch.Generator(device=device).manual_seed(seed + i)
        rows.append(
            sample(
                model,
                timesteps,
                count,
                seq_len,
                settings,
                generator=generator,
                on_step=on_step,
                **conditioning,
            )
        )
    return torch.cat(rows)


def sampling_batch_size(vocab_size: int, d_model: int, seq_len: int) -> int:
    """Samples per solver batch whose largest activations fit `SAMPLING_MEMORY` bytes.

    Per sample and token a step holds the fp32 logits (vocab_size) and a few d_model-wide
    activations; a larger request is sampled in batches of this size, never allocated at once.
    """
    return max(1, SAMPLING_MEMORY // (seq_len * (vocab_size + 16 * d_model) * 4))


def check_sampling_request(num_samples: int, steps: int, seed: int, batch_size: int | None = None) -> None:
    """Counts and seed that sampling can honour: integers (not bools, not floats), in range.

    Raises:
        ValueError: one line naming the value and its range.
    """
    counts = {'num_samples': num_samples, 'steps': steps, 'seed': seed, 'batch_size': batch_size}
    for name, value in counts.items():
        if value is None and name == 'batch_size':
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f'{name} (--{name}) must be an integer, got {value!r}')
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f'batch_size {batch_size} must be positive (or None: as many as fit in memory)')
    if num_samples > MAX_SAMPLES:
        raise ValueError(
            f'--num_samples {num_samples:,} is more than one call samples ({MAX_SAMPLES:,}); split the '
            'request over several calls with other seeds'
        )
    if num_samples <= 0 or steps <= 0:
        raise ValueError(f'--num_samples {num_samples} and --steps {steps} must be positive')
    if not 0 <= seed <= 2**63 - 1 - num_samples:  # batch i draws with seed + i, a 64-bit seed
        raise ValueError(f'seed (--seed) {seed} must lie in [0, 2^63 - 1 - num_samples]')
    if steps > MAX_SAMPLING_STEPS:
        raise ValueError(
            f'{steps} solver steps would run for days to no gain; use at most {MAX_SAMPLING_STEPS:,} '
            '(a few hundred reach the ODE solution)'
        )


def _euler_or_heun(
    denoiser: _Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    settings: SamplerSettings,
    on_step,
) -> torch.Tensor:
    """Euler steps x <- x + (t' - t) d(x, t) with d = -t s / tau; Heun adds the trapezoidal correction."""
    tau, last = settings.tau, len(timesteps) - 2
    for i in range(last + 1):
        denoiser.visit(i, x)
        t_i, t_next = timesteps[i], timesteps[i + 1]
        direction = -t_i * score(denoiser(x, settings.model_time(t_i, t_next)), x, t_i) / tau
        x_euler = x + (t_next - t_i) * direction
        if settings.solver == 'heun' and i < last:  # The last step stays Euler (EDM Alg. 1).
            x0_next = denoiser(x_euler, settings.model_time(t_next))  # Heun: never at the next time
            direction_next = -t_next * score(x0_next, x_euler, t_next) / tau
            x = x + (t_next - t_i) * 0.5 * (direction + direction_next)
        else:
            x = x_euler
        if on_step is not None:
            on_step(i)
    denoiser.visit(last + 1, x)
    return x


def _exponential_integrator(
    denoiser: _Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    settings: SamplerSettings,
    on_step,
) -> torch.Tensor:
    """The exponential integrator of dx/ds = r (x - x0_hat), s = ln t, r = 1/tau, one pass per step.

    Over a step of length h = ln(t / t') the exact solution is
    x' = e^(-rh) x + r int_0^h e^(-rv) x0_hat(s' + v) dv. 'exponential' holds x0_hat at this
    step's estimate D_i: x' = e^(-rh) x + (1 - e^(-rh)) D_i = D_i + (t'/t)^r (x - D_i).
    'dpmpp_2m' (DPM-Solver++(2M)) takes x0_hat linear in s through D_i and the previous step's
    D_(i-1) (h_prev back) and adds -(c / h_prev) (D_i - D_(i-1)), with
    c = (1 - e^(-rh) (1 + rh)) / r - h (1 - e^(-rh)); its first step is the exponential one.
    """
    r = 1.0 / settings.tau
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (D_(i-1), h_prev)
    for i in range(len(timesteps) - 1):
        denoiser.visit(i, x)
        t_i, t_next = timesteps[i], timesteps[i + 1]
        x0_hat = denoiser(x, settings.model_time(t_i))  # Euler only evaluates at the next time
        h = torch.log(t_i / t_next)
        decay = torch.exp(-r * h)
        x_next = decay * x + (1.0 - decay) * x0_hat
        if previous is not None and settings.solver == 'dpmpp_2m':
            before, h_prev = previous
            c = (1.0 - decay * (1.0 + r * h)) / r - h * (1.0 - decay)
            x_next = x_next - (c / h_prev) * (x0_hat - before)
        previous, x = (x0_hat, h), x_next
        if on_step is not None:
            on_step(i)
    denoiser.visit(len(timesteps) - 1, x)
    return x


def _distilled(
    denoiser: _Denoiser, x: torch.Tensor, timesteps: torch.Tensor, settings: SamplerSettings, on_step
) -> torch.Tensor:
    """A distilled student's passes; returns the last pass's logits (B, L, V).

    Pass i at t_i reads its landing time t_(i+1) and lands at x0_hat + (t_(i+1)/t_i)^(1/tau) (x - x0_hat),
    the exponential step, which the student was trained to make land where the teacher's solver
    does (`distillation.jump_target`). The last pass lands at t_min: its argmax is the sample.
    """
    r, last = 1.0 / settings.tau, len(timesteps) - 2
    for i in range(last):
        t_i, t_next = timesteps[i], timesteps[i + 1]
        x0_hat = denoiser(x, t_i, t_next)
        x = x0_hat + (t_next / t_i) ** r * (x - x0_hat)
        if on_step is not None:
            on_step(i)
    logits = denoiser.logits(x, timesteps[last], timesteps[last + 1])
    if on_step is not None:
        on_step(last)
    return logits


def sampling_defaults(sampling: dict[str, Any] | None) -> tuple[str, float, int]:
    """(solver, tau, steps) a model samples with by default: its recorded `sampling`, else the library's.

    `sampling` is what a model's spec records (`RunSpec.sampling`; a distilled student's solver,
    temperature, default count and times), or None.
    """
    own = sampling or {}
    return own.get('solver', DEFAULT_SOLVER), float(own.get('tau', 1.0)), int(own.get('steps', DEFAULT_STEPS))


def distilled_timesteps(sampling: dict[str, Any] | None, steps: int) -> torch.Tensor:
    """A distilled student's pass times for `steps` network evaluations, then t_min: (steps + 1,) float64.

    Raises:
        ValueError: the model is no student, or was not distilled for that count.
    """
    schedules = (sampling or {}).get('timesteps') if sampling_defaults(sampling)[0] == DISTILLED else None
    if not schedules:
        raise ValueError('solver distilled samples a distilled student only; this model is not one')
    if str(steps) not in schedules:
        counts = ', '.join(sorted(schedules, key=int))
        raise ValueError(
            f'this student was distilled for {counts} network evaluations; pass --steps one of them'
        )
    return torch.tensor(schedules[str(steps)], dtype=torch.float64)


def network_evaluations(settings: SamplerSettings, steps: int, guided: bool = False) -> int:
    """Denoiser passes per sample for `steps` solver steps, the final argmax pass included.

    Heun takes two per step but the last; a distilled student's last step is its argmax pass;
    guidance (`guided`: g != 1 and something given) doubles every pass. Self-conditioning reuses
    the previous estimate: no extra pass.
    """
    passes = {'heun': 2 * steps, DISTILLED: steps}.get(settings.solver, steps + 1)
    return passes * (2 if guided else 1)


class _Denoiser:
    """x0_hat(x, t) with guidance and self-conditioning state; counts nothing, hides nothing."""

    def __init__(
        self,
        model: CDCDTransformer,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        settings: SamplerSettings,
        on_state: Callable[[int, torch.Tensor], None] | None = None,
    ):
        # Contiguous: a compiled denoiser guards on strides, and prompts arrive broadcast.
        self.model, self.tokens, self.mask = model, tokens.contiguous(), mask.contiguous()
        self.settings, self.on_state = settings, on_state
        self.self_cond = torch.zeros(*tokens.shape, model.config.d_embed, device=tokens.device)
        # Guidance needs an unconditional pass only when something is given and g != 1.
        self.guided = settings.guidance != 1.0 and not bool(mask.all())
        self.all_generated = torch.ones_like(mask)

    def visit(self, i: int, x: torch.Tensor) -> None:
        """Shows the solver's state x at its step i to `on_state` (`sample`), if any."""
        if self.on_state is not None:
            self.on_state(i, x)

    def _call(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor,
        t_next: torch.Tensor | None,
        *,
        expected: bool,
    ) -> DenoiserOutput:
        landing = None if t_next is None else t_next.expand(len(x))
        return self.model(
            self.tokens,
            t.expand(len(x)),
            mask,
            self.self_cond,
            x_t=x,
            expected_embedding=expected,
            t_next=landing,
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor | None = None) -> torch.Tensor:
        """x0_hat (B, L, d_embed) at noise level t (scalar tensor); t_next: a student's landing time."""
        x0_hat = self._call(x, t, self.mask, t_next, expected=True).x0_hat
        if self.guided:
            unconditional = self._call(x, t, self.all_generated, t_next, expected=True).x0_hat
            x0_hat = unconditional + self.settings.guidance * (x0_hat - unconditional)
        if self.settings.self_conditioning:
            self.self_cond = x0_hat
        return x0_hat

    def logits(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor | None = None) -> torch.Tensor:
        """The final pass: logits (B, L, V) at t, guided in logit space like x0_hat above."""
        logits = self._call(x, t, self.mask, t_next, expected=False).logits
        if self.guided:
            unconditional = self._call(x, t, self.all_generated, t_next, expected=False).logits
            logits = unconditional + self.settings.guidance * (logits - unconditional)
        return logits


def decode_samples(tokens: torch.Tensor, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> list[str]:
    """Decodes (B, L) ids to text, dropping everything from the first end-of-story token on.

    Position 0 holds the start token, so the search for the end starts at position 1.
    """
    texts = []
    for row in tokens.tolist():
        end = row.index(eos_id, 1) if eos_id in row[1:] else len(row)
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts
