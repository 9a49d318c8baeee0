"""How a solve is run: one options module for the probability-flow ODE and the reverse SDE.

`make_ode_options` and `make_sde_options` are the edge where the public functions' arguments
(strings included) are checked and become one `eqx.Module` each; below them nothing compares
strings. In both, the tolerances are arrays, so a sweep over them (an NFE-versus-quality curve)
reuses one compilation; solvers, step counts, clocks and schedules are static. Solver costs,
capabilities (`has_error_estimate`) and the error order come from `_nfe`, the one table.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from ._dpm import AbstractExponentialIntegrator
from ._nfe import ADAPTIVE_SDE_SOLVERS, check_ode_solver, has_error_estimate, solver_costs
from ._time import (
    AbstractClock,
    AbstractStepSchedule,
    LinearTime,
    SqrtTime,
    UniformSchedule,
    as_clock,
    as_schedule,
)
from ._validate import check_positive_float, check_positive_int

__all__ = ["ODEOptions", "SDEOptions", "make_ode_options", "make_sde_options"]


class ODEOptions(eqx.Module):
    """How to solve the probability-flow ODE: diffrax solver, tolerances or fixed steps.

    The tolerances are arrays, so sweeping them (NFE-versus-quality curves) reuses one
    compilation; everything else is static.
    """

    solver: diffrax.AbstractSolver
    rtol: Array
    atol: Array
    steps: int | None = eqx.field(static=True, default=None)
    max_steps: int = eqx.field(static=True, default=16384)
    clock: AbstractClock = eqx.field(static=True, default_factory=lambda: as_clock("t"))
    # The times of a fixed-step solve (None: adaptive).
    schedule: AbstractStepSchedule | None = eqx.field(static=True, default=None)

    @property
    def adaptive(self) -> bool:
        return self.steps is None

    @property
    def time(self) -> str:
        """The clock's public name ("t", "log_snr", "sqrt_t")."""
        return self.clock.name


def make_ode_options(
    solver, rtol, atol, steps, max_steps, time="t", schedule=None
) -> ODEOptions:
    """The edge: strings become clock and schedule objects here, once. `schedule=None` is the
    exponential integrator's own schedule, else uniform in sqrt(t) (time="t") or in the clock."""
    if solver is None:
        solver = diffrax.Tsit5()
    check_ode_solver(solver)
    rtol = check_positive_float(rtol, "rtol")
    atol = check_positive_float(atol, "atol")
    steps = check_positive_int(steps, "steps", allow_none=True)
    max_steps = check_positive_int(max_steps, "max_steps")
    clock = as_clock(time)
    schedule = as_schedule(schedule)
    if isinstance(solver, AbstractExponentialIntegrator):
        solver.check_clock(clock)
    if (
        steps is None
        and isinstance(solver, AbstractExponentialIntegrator)
        and not solver.supports_adaptive
    ):
        raise ValueError(
            f"steps=None needs an error estimate, which {solver!r} lacks: pass steps=N, or use "
            "the adaptive pf.DPMSolver(order=2) or pf.DPMSolver(order=3) (DPM-Solver-12/23)"
        )
    if steps is None and not has_error_estimate(solver):
        raise ValueError(
            f"solver={type(solver).__name__} has no error estimate, so it cannot choose its own "
            "steps: pass steps=N for N uniform steps, or an adaptive solver such as "
            "diffrax.Tsit5()"
        )
    if steps is not None and steps > max_steps:
        raise ValueError(f"steps={steps} exceeds max_steps={max_steps}; raise max_steps")
    if steps is None:
        if schedule is not None:
            raise ValueError(
                "schedule= lays the steps of a fixed-step solve: pass steps=N with it, or "
                "schedule=None for an adaptive solve"
            )
    elif schedule is None:
        if isinstance(solver, AbstractExponentialIntegrator):
            schedule = solver.schedule
        elif isinstance(clock, LinearTime):
            # Uniform in sqrt(t), as the exponential integrators' default: Heun with 10 steps
            # has 11x less solver error on digits-vp than with steps uniform in t
            # (docs/samplers.md, benchmarks/schedules.py).
            schedule = UniformSchedule(SqrtTime())
        else:
            schedule = UniformSchedule(clock)
    return ODEOptions(
        solver=solver, rtol=jnp.asarray(rtol), atol=jnp.asarray(atol), steps=steps,
        max_steps=max_steps, clock=clock, schedule=schedule,
    )


class SDEOptions(eqx.Module):
    """How to solve the reverse SDE: diffrax solver, fixed steps or adaptive tolerances.

    As in `ODEOptions`, the tolerances are arrays (a sweep reuses one compilation); the step
    counts are static.
    """

    solver: diffrax.AbstractSolver
    rtol: Array
    atol: Array
    steps: int | None = eqx.field(static=True, default=1000)
    max_steps: int = eqx.field(static=True, default=16384)

    @property
    def adaptive(self) -> bool:
        return self.steps is None


def make_sde_options(solver, steps, rtol, atol, max_steps) -> SDEOptions:
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(
            f"solver must be a diffrax SDE solver such as diffrax.Euler(), got "
            f"{type(solver).__name__}"
        )
    solver_costs(solver, sde=True)  # raises for solvers whose evaluations cannot be counted
    steps = check_positive_int(steps, "steps", allow_none=True)
    rtol = check_positive_float(rtol, "rtol")
    atol = check_positive_float(atol, "atol")
    max_steps = check_positive_int(max_steps, "max_steps")
    if steps is None and not has_error_estimate(solver, sde=True):
        names = ", ".join(c.__name__ for c in ADAPTIVE_SDE_SOLVERS)
        raise ValueError(
            f"solver={type(solver).__name__} cannot choose its own steps for an SDE (no error "
            f"estimate, or not convergent with adaptive steps): pass steps=N, or steps=None "
            f"with one of {names}"
        )
    if steps is not None and steps > max_steps:
        raise ValueError(f"steps={steps} exceeds max_steps={max_steps}; raise max_steps")
    return SDEOptions(
        solver=solver, rtol=jnp.asarray(rtol), atol=jnp.asarray(atol), steps=steps,
        max_steps=max_steps,
    )
