"""Solve plans: how the probability-flow ODE (`ODEOptions`) or the reverse SDE (`SDEOptions`) is
solved, as one validated `eqx.Module` built once at the edge.

A plan is keyword-constructible by users (`pf.ODEOptions(solver=diffrax.Heun(), steps=10)`) and
is what the public functions build from their solve keywords, so `options=` and the keywords give
the same plan and the same results, bit for bit. The constructor owns every default and turns
strings into objects (clocks, schedules); `__check_init__` validates; the solver's traits
(`_nfe.SolverTraits`: costs, error estimate, FSAL, clocks, refill, binding) are computed here once
and carried in the plan. Below the plan nothing compares strings or inspects the solver.

The tolerances are arrays, so a sweep over them (an NFE-versus-quality curve) reuses one
compilation; solvers, step counts, clocks, schedules and the scheduler are static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ._nfe import AbstractCountedSolver, SolverTraits, solver_traits
from ._pc import (
    AbstractCorrector,
    AbstractPredictor,
    LangevinCorrector,
    ReverseDiffusionPredictor,
    check_pc_options,
)
from ._sde import VPSDE, AbstractSDE
from ._time import (
    AbstractClock,
    AbstractStepSchedule,
    LinearTime,
    SqrtTime,
    UniformSchedule,
    as_clock,
    as_schedule,
)
from ._validate import check_positive_int

__all__ = [
    "MAX_STEPS",
    "AbstractScheduler",
    "Lockstep",
    "ODEOptions",
    "Refill",
    "SDEOptions",
    "default_slots",
    "ode_options",
    "sde_options",
]

#: The most steps a solve may take before it fails (every plan's default).
MAX_STEPS = 16384

#: bits_per_dim's tolerance, from the work-precision sweep of benchmarks/likelihood_real.py
#: (docs/benchmarks.md, "Bits/dim on real networks"): on the shipped digits U-Net and an MNIST
#: U-Net the fastest setting whose bias stays far below 1e-3 bits/dim, at half the evaluations
#: of rtol = atol = 1e-5, which `log_likelihood` keeps and the paper uses (RK45).
BPD_TOL = 3e-4


# --------------------------------------------------------------------------- schedulers


class AbstractScheduler(eqx.Module):
    """How the examples of a batch share the solve: `pf.Lockstep()` or `pf.Refill(slots)`."""


class Lockstep(AbstractScheduler):
    """The whole batch in one vmapped solve: every example steps until the slowest finishes (its
    own step sizes, but the batch costs its largest NFE). Fixed-step solves always run so."""


def default_slots(example_size: int) -> int:
    """`pf.Refill()`'s slots for examples of `example_size` dimensions. On CPU the cost per example
    of a batched evaluation stops falling at a few dozen examples, and fewer slots leave fewer
    idle at the end: 64 slots up to 512 dimensions (8x8 digits), 32 up to 2048 (28x28 MNIST),
    else 16 (docs/benchmarks.md). Accelerators need wide batches to be busy: 1024."""
    if jax.default_backend() != "cpu":
        return 1024
    return 64 if example_size <= 512 else 32 if example_size <= 2048 else 16


class Refill(AbstractScheduler):
    """`slots` examples at a time, a slot refilled as soon as its example finishes (`_refill.py`):
    the batch costs its mean NFE, not its largest, and each example's result and `nfe` are those
    of its own solve. Adaptive solves only (a fixed-step plan runs in lockstep).

    **Arguments:**

    - `slots`: a positive int, or `"auto"` (the default): chosen at the call from the example's
      size and the backend (`default_slots`: 64/32/16 on CPU, 1024 on accelerators).
    """

    slots: int | str = "auto"

    def __check_init__(self):
        if self.slots != "auto":
            check_positive_int(self.slots, "slots")

    def resolve(self, example_size: int) -> Refill:
        """This scheduler with `"auto"` replaced by a number of slots."""
        if self.slots == "auto":
            return Refill(default_slots(example_size))
        return self


def as_scheduler(slots) -> AbstractScheduler:
    """The scheduler for the `slots=` keyword: an int (refill with that many slots), "auto",
    "lockstep" or None (lockstep), or a scheduler object."""
    if isinstance(slots, AbstractScheduler):
        return slots
    if slots is None or slots == "lockstep":
        return Lockstep()
    if slots == "auto":
        return Refill()
    if isinstance(slots, str) or isinstance(slots, bool):
        raise ValueError(
            f"slots must be a positive integer, 'auto', 'lockstep' or None, got {slots!r}"
        )
    return Refill(check_positive_int(slots, "slots"))  # pyright: ignore[reportArgumentType]


# --------------------------------------------------------------------------- checks


def _check_tolerance(value, name: str) -> Array:
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.floating, np.ndarray, jax.Array)
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    try:
        v = float(value)
    except jax.errors.ConcretizationTypeError:  # traced (a plan built inside jit): unchecked
        return jnp.asarray(value)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return jnp.asarray(value if isinstance(value, (np.ndarray, jax.Array)) else v)


def _check_steps(steps, max_steps) -> None:
    if steps is not None and steps > max_steps:
        raise ValueError(f"steps={steps} exceeds max_steps={max_steps}; raise max_steps")


# --------------------------------------------------------------------------- the ODE plan


class ODEOptions(eqx.Module):
    """How to solve the probability-flow ODE: a resolved, validated solve plan.

    Pass it as `options=` to `pf.encode`, `pf.decode`, `pf.sample_ode`, `pf.log_likelihood` and
    `pf.bits_per_dim`; their solve keywords build the same plan. Presets:
    `ODEOptions.paper()` (the paper's RK45 = Dopri5 at 1e-5 in t, the whole batch in lockstep)
    and `ODEOptions.bits_per_dim(sde)` (bits_per_dim's default).

    **Arguments:**

    - `solver`: a diffrax ODE solver or a probflow exponential integrator (default
      `diffrax.Tsit5()`).
    - `rtol`, `atol`: the tolerances of an adaptive solve (default 1e-5); scalars, stored as
      arrays so that a sweep over them reuses one compilation.
    - `steps`: None (the default) for adaptive steps, or N for N fixed steps on `schedule`.
    - `max_steps`: the most steps before the solve fails (default 16384).
    - `time`: the clock the solve runs in: `pf.LinearTime()` (`"t"`, the default),
      `pf.LogSNRTime()` (`"log_snr"`) or `pf.SqrtTime()` (`"sqrt_t"`).
    - `schedule`: the times of a fixed-step solve (`pf.UniformSchedule(clock)`,
      `pf.EDMSchedule()`, or a name); None: the exponential integrator's own, else uniform in
      sqrt(t) for time "t" and in the solve's clock otherwise.
    - `scheduler`: `pf.Lockstep()` (the default) or `pf.Refill(slots)`.

    Attributes (besides the arguments): `traits`, the solver's `SolverTraits`.
    """

    solver: diffrax.AbstractSolver
    rtol: Array
    atol: Array
    steps: int | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    time: AbstractClock = eqx.field(static=True)
    schedule: AbstractStepSchedule | None = eqx.field(static=True)
    scheduler: AbstractScheduler = eqx.field(static=True)
    traits: SolverTraits = eqx.field(static=True)

    def __init__(
        self,
        *,
        solver: diffrax.AbstractSolver | None = None,
        rtol: ArrayLike = 1e-5,
        atol: ArrayLike = 1e-5,
        steps: int | None = None,
        max_steps: int = MAX_STEPS,
        time: str | AbstractClock = "t",
        schedule: str | AbstractStepSchedule | AbstractClock | None = None,
        scheduler: AbstractScheduler | None = None,
    ):
        solver = diffrax.Tsit5() if solver is None else solver
        self.traits = solver_traits(solver)
        self.solver = solver
        self.rtol = _check_tolerance(rtol, "rtol")
        self.atol = _check_tolerance(atol, "atol")
        self.steps = check_positive_int(steps, "steps", allow_none=True)
        self.max_steps = check_positive_int(max_steps, "max_steps")  # pyright: ignore
        self.time = as_clock(time)
        schedule = as_schedule(schedule)
        if self.steps is not None and schedule is None:
            own = solver.step_schedule() if isinstance(solver, AbstractCountedSolver) else None
            if own is not None:
                schedule = own
            elif isinstance(self.time, LinearTime):
                # Uniform in sqrt(t), as the exponential integrators' default: Heun with 10 steps
                # has 11x less solver error on digits-vp than with steps uniform in t
                # (docs/samplers.md, benchmarks/schedules.py).
                schedule = UniformSchedule(SqrtTime())
            else:
                schedule = UniformSchedule(self.time)
        self.schedule = schedule
        scheduler = Lockstep() if scheduler is None else scheduler
        if not isinstance(scheduler, AbstractScheduler):
            raise ValueError(
                f"scheduler must be pf.Lockstep() or pf.Refill(slots), got {scheduler!r}"
            )
        # Fixed-step solves cost the same for every example: nothing to refill.
        self.scheduler = Lockstep() if self.steps is not None else scheduler

    def __check_init__(self):
        traits, name = self.traits, type(self.solver).__name__
        if type(self.time) not in traits.clocks:
            allowed = ", ".join(repr(c.name) for c in traits.clocks)
            raise ValueError(
                f"time={self.time.name!r} is not supported by solver={name}, which runs in "
                f"time {allowed}"
            )
        if self.steps is None and not traits.adaptive:
            raise ValueError(
                f"steps=None needs a solver with an error estimate; solver={name} has no error "
                "estimate: pass steps=N for N fixed steps, or an adaptive solver such as "
                "diffrax.Tsit5() or pf.DPMSolver(order=2)"
            )
        if self.steps is None and self.schedule is not None:
            raise ValueError(
                "schedule= lays the steps of a fixed-step solve: pass steps=N with it, or "
                "schedule=None for an adaptive solve"
            )
        _check_steps(self.steps, self.max_steps)
        if self.steps is not None:
            if isinstance(self.solver, AbstractCountedSolver):
                self.solver.check_steps(self.steps)
            if self.schedule is not None:
                self.schedule.check_steps(self.steps)
        if isinstance(self.scheduler, Refill) and type(self.time) not in traits.refill_clocks:
            if traits.refill_clocks:
                allowed = ", ".join(repr(c.name) for c in traits.refill_clocks)
                raise ValueError(
                    f"slots= (pf.Refill) runs {name} in time={allowed} only, got "
                    f"time={self.time.name!r} (or pass slots=None to solve the batch in lockstep)"
                )
            raise ValueError(
                f"slots= (pf.Refill) supports adaptive explicit Runge-Kutta solvers (Tsit5, "
                f"Dopri5, Bosh3, ...) and the adaptive pf.DPMSolver(order=2|3); got solver={name} "
                "(pass slots=None to solve the batch in lockstep)"
            )

    @property
    def adaptive(self) -> bool:
        """Whether the solve chooses its own steps (`steps=None`)."""
        return self.steps is None

    def replace(self, **changes: Any) -> ODEOptions:
        """This plan with some arguments changed (re-validated)."""
        kw: dict[str, Any] = dict(
            solver=self.solver, rtol=self.rtol, atol=self.atol, steps=self.steps,
            max_steps=self.max_steps, time=self.time, schedule=self.schedule,
            scheduler=self.scheduler,
        )
        if "steps" in changes and "schedule" not in changes:
            kw["schedule"] = None  # the new step count's default schedule
        kw.update(changes)
        return ODEOptions(**kw)

    def for_examples(self, example_size: int) -> ODEOptions:
        """This plan with `pf.Refill("auto")` resolved for examples of `example_size`
        dimensions (on this backend); called by the public functions at the edge."""
        if isinstance(self.scheduler, Refill) and self.scheduler.slots == "auto":
            return self.replace(scheduler=self.scheduler.resolve(example_size))
        return self

    @classmethod
    def paper(cls, **overrides: Any) -> ODEOptions:
        """The paper's setting (Song et al. 2021, appendix D): RK45 (Dormand--Prince 5(4),
        `diffrax.Dopri5()`) at rtol = atol = 1e-5 in t, the whole batch in one solve."""
        kw: dict[str, Any] = dict(
            solver=diffrax.Dopri5(), rtol=1e-5, atol=1e-5, time=LinearTime(),
            scheduler=Lockstep(),
        )
        return cls(**(kw | overrides))

    @classmethod
    def sampling(cls, **overrides: Any) -> ODEOptions:
        """Samples to look at (`probflow sample`, the demo): `diffrax.Tsit5()` at rtol = atol =
        1e-3 in t, whose solver error is far below what a picture shows, at a fraction of the
        evaluations of 1e-5 (docs/cli.md)."""
        kw: dict[str, Any] = dict(solver=diffrax.Tsit5(), rtol=1e-3, atol=1e-3)
        return cls(**(kw | overrides))

    @classmethod
    def bits_per_dim(cls, sde: AbstractSDE, **overrides: Any) -> ODEOptions:
        """`pf.bits_per_dim`'s default for `sde`: `diffrax.Dopri5()` at rtol = atol = 3e-4, in
        sqrt(t) time for `VPSDE` (whose std(t) ~ sqrt(beta_min t) near 0: the time change makes
        the field smooth there) and in t otherwise (sub-VP's std(t) ~ beta_min t and VE's is
        smooth already: on digits-subvp sqrt(t) is biased by +2.5e-3 bits/dim, t by +5e-4), or
        in t for solvers that do not run in sqrt(t); `pf.Refill("auto")`. `overrides` replace
        any of these (docs/benchmarks.md)."""
        solver = overrides.pop("solver", None)
        solver = diffrax.Dopri5() if solver is None else solver
        sqrt_t = isinstance(sde, VPSDE) and SqrtTime in solver_traits(solver).clocks
        kw: dict[str, Any] = dict(
            solver=solver, rtol=BPD_TOL, atol=BPD_TOL,
            time=SqrtTime() if sqrt_t else LinearTime(), scheduler=Refill(),
        )
        return cls(**(kw | overrides))


def _given(keywords: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in keywords.items() if v is not None}


def _both(given) -> ValueError:
    # The public keyword for the scheduler is `slots=`.
    names = ("slots" if k == "scheduler" else k for k in given)
    return ValueError(
        "pass the solve settings either as options= or as keywords, not both (got options= "
        f"and {', '.join(k + '=' for k in names)})"
    )


def ode_options(
    options, preset: Callable[..., ODEOptions] = ODEOptions, **keywords: Any
) -> ODEOptions:
    """The edge: the plan of one call, `options` or one built by `preset` from the solve
    keywords that were given (None: not given). Both at once is a one-line ValueError."""
    given = _given(keywords)
    if options is None:
        return preset(**given)
    if not isinstance(options, ODEOptions):
        raise ValueError(f"options must be a pf.ODEOptions, got {type(options).__name__}")
    if given:
        raise _both(given)
    return options


def pc_options(
    options, sde, eps, *, predictor, corrector, steps, denoise
) -> tuple[SDEOptions, AbstractSDE, float, int]:
    """The edge of the predictor-corrector samplers (`sample_pc`, `inpaint`,
    `sample_conditional`): their plan, and the SDE, eps and number of steps checked against it.
    `steps=None` means not given here: a PC sampler always has N noise levels."""
    opts = sde_options(options, predictor=predictor, corrector=corrector,
                       steps=UNSET if steps is None else steps, denoise=denoise)
    sde, eps, steps = check_pc_options(sde, opts.predictor, opts.corrector, opts.steps, eps)
    return opts, sde, eps, steps


# --------------------------------------------------------------------------- the SDE plan


class SDEOptions(eqx.Module):
    """How to sample the reverse SDE: a resolved, validated solve plan.

    Pass it as `options=` to `pf.sample_sde` (which reads `solver`, `steps`, `rtol`, `atol`,
    `max_steps`) and to the predictor-corrector samplers `pf.sample_pc`, `pf.inpaint`,
    `pf.colorize`, `pf.sample_conditional` (which read `predictor`, `corrector`, `steps`,
    `denoise`); their keywords build the same plan.

    **Arguments:**

    - `solver`: a diffrax SDE solver for `sample_sde` (default `diffrax.Euler()`,
      Euler--Maruyama).
    - `steps`: N uniform steps (default 1000), or None for adaptive steps (`sample_sde` with an
      adaptive SDE solver only).
    - `rtol`, `atol`: tolerances of an adaptive `sample_sde` solve (default 1e-3).
    - `max_steps`: the most steps before the solve fails (default 16384).
    - `predictor`: the PC samplers' predictor (default `pf.ReverseDiffusionPredictor()`).
    - `corrector`: their corrector (default `pf.LangevinCorrector(snr=0.16, steps=1)`), or None.
    - `denoise`: whether the PC samplers end with Tweedie's denoising step (default True).

    Attributes (besides the arguments): `traits`, the SDE solver's `SolverTraits`.
    """

    solver: diffrax.AbstractSolver
    rtol: Array
    atol: Array
    steps: int | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    predictor: AbstractPredictor
    corrector: AbstractCorrector | None
    denoise: bool = eqx.field(static=True)
    traits: SolverTraits = eqx.field(static=True)

    def __init__(
        self,
        *,
        solver: diffrax.AbstractSolver | None = None,
        steps: int | None = 1000,
        rtol: ArrayLike = 1e-3,
        atol: ArrayLike = 1e-3,
        max_steps: int = MAX_STEPS,
        predictor: AbstractPredictor | None = None,
        corrector: AbstractCorrector | None = LangevinCorrector(snr=0.16, steps=1),
        denoise: bool = True,
    ):
        solver = diffrax.Euler() if solver is None else solver
        if not isinstance(solver, diffrax.AbstractSolver):
            raise ValueError(
                f"solver must be a diffrax SDE solver such as diffrax.Euler(), got "
                f"{type(solver).__name__}"
            )
        self.traits = solver_traits(solver, sde=True)
        self.solver = solver
        self.steps = check_positive_int(steps, "steps", allow_none=True)
        self.rtol = _check_tolerance(rtol, "rtol")
        self.atol = _check_tolerance(atol, "atol")
        self.max_steps = check_positive_int(max_steps, "max_steps")  # pyright: ignore
        self.predictor = ReverseDiffusionPredictor() if predictor is None else predictor
        self.corrector = corrector
        self.denoise = denoise

    def __check_init__(self):
        if self.steps is None and not self.traits.adaptive:
            raise ValueError(
                f"solver={type(self.solver).__name__} cannot choose its own steps for an SDE (no "
                "error estimate, or not convergent with adaptive steps): pass steps=N, or "
                "steps=None with one of Heun, ReversibleHeun, SRA1, ShARK, SPaRK"
            )
        _check_steps(self.steps, self.max_steps)
        if not isinstance(self.predictor, AbstractPredictor):
            raise ValueError(
                "predictor must be a probflow predictor object: ReverseDiffusionPredictor(), "
                f"EulerMaruyamaPredictor() or AncestralSamplingPredictor(), got {self.predictor!r}"
            )
        if self.corrector is not None and not isinstance(self.corrector, AbstractCorrector):
            raise ValueError(
                "corrector must be a probflow corrector object such as LangevinCorrector(snr=0.16, "
                f"steps=1) or AnnealedLangevinCorrector(...), or None, got {self.corrector!r}"
            )
        if not isinstance(self.denoise, bool):
            raise ValueError(f"denoise must be True or False, got {self.denoise!r}")

    @property
    def adaptive(self) -> bool:
        return self.steps is None


class _Unset:
    """The default of a keyword for which None means something (`corrector=None`: none)."""

    def __repr__(self) -> str:
        return "UNSET"


#: "Not given": the plan's default applies.
UNSET: Any = _Unset()


# steps=None: adaptive steps; corrector=None: no corrector.
_NONE_MEANS_SOMETHING = ("steps", "corrector")


def sde_options(options, **keywords: Any) -> SDEOptions:
    """The edge for the stochastic samplers: `options`, or the plan built from the keywords that
    were given (None, or `UNSET` for `corrector`: not given)."""
    given: dict[str, Any] = {
        k: v for k, v in keywords.items()
        if v is not UNSET and (v is not None or k in _NONE_MEANS_SOMETHING)
    }
    if options is None:
        return SDEOptions(**given)
    if not isinstance(options, SDEOptions):
        raise ValueError(f"options must be a pf.SDEOptions, got {type(options).__name__}")
    if given:
        raise _both(given)
    return options
