"""Honest NFE: how many score-model evaluations a diffrax solve spent.

diffrax reports solver steps, not evaluations. Each ODE solver's cost is stated here once, as
evaluations (at initialisation, per attempt at the first step, per later attempt), following
diffrax 0.7's own implementation (verified against a host-side counter in tests/test_nfe.py):

- explicit Runge--Kutta with s stages: s evaluations per attempted step (accepted or rejected).
  First-same-as-last (FSAL) tableaus reuse the last stage of the previous accepted step, so s - 1
  per attempt once a step has been accepted; until then every attempt pays all s (diffrax keeps
  the solver state, which holds the FSAL value, only when a step is accepted);
- Euler and LeapfrogMidpoint: 1 per step; ReversibleHeun: 1 per step plus 1 at initialisation;
- `diffrax.HalfSolver(solver)`: per attempt, a full step and a first half step from the same
  solver state, and a second half step from the first half step's state;
- adaptive solves: 2 more evaluations for the initial step-size selection (Hairer, Norsett &
  Wanner, II.4), which probflow performs itself (`select_initial_step`, here: the one
  implementation, used by the per-example solves and by the refill loop).

The attempts at the first step are counted by `FirstStepCountingController`, whose state, unlike
the solver's, survives rejected steps.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, cast

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int

from ._time import AbstractClock, AbstractStepSchedule, LinearTime, LogSNRTime, SqrtTime

# (at initialisation, per attempt before the first accepted step, per later attempt)
Costs = tuple[int, int, int]


class AbstractCountedSolver(eqx.Module):
    """A probflow solver that states its own traits (mixed into diffrax solvers): its evaluation
    costs, whether it has an error estimate, the clocks it runs in, and whether probflow binds it
    to the SDE before a solve (`SolverTraits`)."""

    @abc.abstractmethod
    def evaluation_costs(self) -> Costs:
        """Score evaluations (at initialisation, per attempt at the first step, per later
        attempt), without the step-size selection."""

    @property
    def supports_adaptive(self) -> bool:
        """Whether the solver has an error estimate (can run with steps=None)."""
        return False

    @property
    def clocks(self) -> tuple[type[AbstractClock], ...]:
        """The clocks (`time=`) the solver runs in."""
        return _ALL_CLOCKS

    @property
    def refill_clocks(self) -> tuple[type[AbstractClock], ...]:
        """The clocks in which the refill scheduler (`pf.Refill`) can run it (none: never)."""
        return ()

    @property
    def needs_binding(self) -> bool:
        """Whether probflow binds it to the SDE, clock and step count before a solve (`bind`)."""
        return False

    def step_schedule(self) -> AbstractStepSchedule | None:
        """The solver's own schedule for a fixed-step solve (None: the plan's default)."""
        return None

    def check_steps(self, steps: int) -> None:
        """A one-line ValueError if the solver cannot take `steps` fixed steps (default: it
        can)."""


_ALL_CLOCKS: tuple[type[AbstractClock], ...] = (LinearTime, LogSNRTime, SqrtTime)

_SUPPORTED = (
    "explicit Runge-Kutta solvers (Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, "
    "Dopri8), ReversibleHeun, LeapfrogMidpoint, diffrax.HalfSolver of any of these, and "
    "probflow's DPMSolver/DPMSolverMultistep"
)


# The one cost table: score evaluations (at initialisation, per attempt at the first step, per
# later attempt) of every supported solver whose costs do not follow from an explicit Runge--Kutta
# tableau, and whether it solves ODEs and/or SDEs here. Measured against a host-side counter
# (tests/test_nfe.py, tests/test_samplers.py); the SDE's diffusion term never calls the model, and
# no SDE solver here carries an evaluation from one step to the next (no FSAL tableau).
# Adding a diffrax solver is one row here (or nothing, for an explicit Runge--Kutta tableau);
# a probflow solver states its traits itself (`AbstractCountedSolver`).
_COSTS: dict[type, tuple[Costs, bool, bool]] = {  # type: (costs, solves ODEs, solves SDEs)
    diffrax.Euler: ((0, 1, 1), True, True),
    diffrax.LeapfrogMidpoint: ((0, 1, 1), True, False),
    diffrax.ReversibleHeun: ((1, 1, 1), True, True),
    diffrax.EulerHeun: ((0, 1, 1), False, True),
    diffrax.ItoMilstein: ((0, 1, 1), False, True),
    diffrax.StratonovichMilstein: ((0, 1, 1), False, True),
    diffrax.SEA: ((0, 1, 1), False, True),
    diffrax.SRA1: ((0, 2, 2), False, True),
    diffrax.ShARK: ((0, 2, 2), False, True),
    diffrax.GeneralShARK: ((0, 2, 2), False, True),
    diffrax.SPaRK: ((0, 3, 3), False, True),
    diffrax.SlowRK: ((0, 2, 2), False, True),
}
# Explicit Runge--Kutta tableaus that also solve the (Stratonovich, additive-noise) reverse SDE;
# their costs follow from the tableau, as for ODEs.
_SDE_TABLEAU_SOLVERS = (diffrax.Heun, diffrax.Midpoint, diffrax.Ralston)
# Solvers of the table above with an error estimate for ODEs (tableaus: from `b_error`).
_ADAPTIVE_ODE_SOLVERS = (diffrax.ReversibleHeun,)
# SDE solvers with an error estimate that diffrax accepts for adaptive SDE solves.
ADAPTIVE_SDE_SOLVERS = (diffrax.Heun, diffrax.ReversibleHeun, diffrax.SRA1, diffrax.ShARK,
                        diffrax.SPaRK)


def _explicit_tableau(solver) -> diffrax.ButcherTableau | None:
    """The Butcher tableau of an explicit Runge--Kutta solver (not wrapped), else None."""
    if (
        not isinstance(solver, diffrax.HalfSolver)  # isinstance sees through the wrapper
        and isinstance(solver, diffrax.AbstractRungeKutta)
        and isinstance(solver.tableau, diffrax.ButcherTableau)
        and not solver.tableau.implicit
    ):
        return solver.tableau
    return None


def _tableau_costs(solver) -> Costs | None:
    tableau = _explicit_tableau(solver)
    if tableau is None:
        return None
    stages = len(tableau.c) + 1
    return 0, stages, stages - 1 if tableau.fsal else stages


class SolverTraits(eqx.Module):
    """What probflow needs to know about a solver, computed once from the one table
    (`solver_traits`) and carried in the solve plan (`pf.ODEOptions.traits`,
    `pf.SDEOptions.traits`): the solves, the refill scheduler and the NFE counters read these
    fields and never inspect the solver again."""

    costs: Costs  # evaluations (at initialisation, per attempt at the first step, per later one)
    adaptive: bool  # has an error estimate: can choose its own steps (steps=None)
    fsal: bool  # first-same-as-last explicit Runge--Kutta tableau
    explicit_rk: bool  # an explicit Runge--Kutta tableau (not wrapped)
    error_order: float | None  # diffrax's error order for an ODE term (as its controller uses)
    clocks: tuple[type[AbstractClock], ...]  # the clocks (`time=`) it runs in
    refill_clocks: tuple[type[AbstractClock], ...]  # those in which `pf.Refill` can run it
    needs_binding: bool  # probflow binds it to the SDE before a solve (exponential integrators)

    @property
    def step_order(self) -> float:
        """The order of the initial step-size selection (diffrax's error order, 2 if none)."""
        return 2.0 if self.error_order is None else float(self.error_order)

    @property
    def refillable(self) -> bool:
        return bool(self.refill_clocks)


def _unsupported(solver) -> ValueError:
    return ValueError(
        f"solver={type(solver).__name__} is not supported: probflow counts score evaluations "
        f"exactly and knows how for {_SUPPORTED}"
    )


def _ode_costs_and_adaptive(solver) -> tuple[Costs, bool]:
    if isinstance(solver, AbstractCountedSolver):
        return solver.evaluation_costs(), solver.supports_adaptive
    # First: diffrax's isinstance sees through wrapped solvers (HalfSolver(Euler()) "is" Euler).
    if isinstance(solver, diffrax.HalfSolver):
        if isinstance(solver.solver, AbstractCountedSolver):
            raise ValueError(
                f"solver=HalfSolver({type(solver.solver).__name__}(...)) is not supported: "
                "probflow's exponential integrators are bound to the SDE by probflow and carry "
                "their own error estimate; pass steps=None with pf.DPMSolver(order=2) or "
                "pf.DPMSolver(order=3) instead"
            )
        try:
            (init, first, later), _ = _ode_costs_and_adaptive(solver.solver)
        except ValueError:
            raise ValueError(
                f"solver=HalfSolver({type(solver.solver).__name__}) is not supported: probflow "
                f"counts score evaluations exactly and knows how for {_SUPPORTED}"
            ) from None
        # The full step and the first half step start from the step's solver state; the second
        # half step from the first half step's (after which FSAL is available).
        return (init, 2 * first + later, 3 * later), True
    entry = _COSTS.get(type(solver))
    if entry is not None and entry[1]:
        return entry[0], isinstance(solver, _ADAPTIVE_ODE_SOLVERS)
    costs = _tableau_costs(solver)
    if costs is None:
        raise _unsupported(solver)
    b_error = solver.tableau.b_error
    adaptive = b_error is not None and any(float(b) != 0.0 for b in b_error)
    return costs, bool(adaptive)


def _sde_costs(solver) -> Costs:
    entry = _COSTS.get(type(solver))
    costs = entry[0] if entry is not None and entry[2] else None
    if costs is None and type(solver) in _SDE_TABLEAU_SOLVERS:
        costs = _tableau_costs(solver)
    if costs is None:
        names = sorted([c.__name__ for c, e in _COSTS.items() if e[2]]
                       + [c.__name__ for c in _SDE_TABLEAU_SOLVERS])
        raise ValueError(
            f"solver={type(solver).__name__} is not supported by sample_sde: probflow counts "
            f"score evaluations exactly and knows how for the diffrax SDE solvers "
            f"{', '.join(names)}"
        )
    return costs


def _identity_field(t, y, args):
    return y


def solver_traits(solver, *, sde: bool = False) -> SolverTraits:
    """The traits of `solver` for a probability-flow ODE solve, or with `sde=True` for a
    reverse-SDE solve; ValueError (one line) for a solver probflow cannot count. The one place
    that inspects a solver."""
    if not isinstance(solver, (diffrax.AbstractSolver, AbstractCountedSolver)):
        raise ValueError(f"solver must be a diffrax solver, got {type(solver).__name__}")
    if sde:
        return SolverTraits(
            costs=_sde_costs(solver), adaptive=isinstance(solver, ADAPTIVE_SDE_SOLVERS),
            fsal=False, explicit_rk=False, error_order=None, clocks=(), refill_clocks=(),
            needs_binding=False,
        )
    costs, adaptive = _ode_costs_and_adaptive(solver)
    tableau = _explicit_tableau(solver)
    order = cast(Any, solver).error_order(diffrax.ODETerm(_identity_field))
    error_order = None if order is None else float(order)
    if isinstance(solver, AbstractCountedSolver):
        clocks, refill, binds = solver.clocks, solver.refill_clocks, solver.needs_binding
    else:
        clocks, binds = _ALL_CLOCKS, False
        # The refill scheduler steps explicit Runge--Kutta tableaus with an error estimate.
        refill = _ALL_CLOCKS if tableau is not None and adaptive else ()
    return SolverTraits(
        costs=costs, adaptive=adaptive, fsal=tableau is not None and bool(tableau.fsal),
        explicit_rk=tableau is not None, error_order=error_order, clocks=clocks,
        refill_clocks=refill, needs_binding=binds,
    )


def solver_costs(solver, *, sde: bool = False) -> Costs:
    """(evaluations at init, per attempt at the first step, per later attempt) of `solver` in an
    ODE solve, or with `sde=True` in a reverse-SDE solve (`solver_traits(...).costs`)."""
    return solver_traits(solver, sde=sde).costs


def select_initial_step(vector_field, y0, t0, t1, rtol, atol, order: float):
    """`(h, F(t0, y0))`: the first step size of an adaptive solve (Hairer, Norsett & Wanner,
    Solving ODEs I, II.4) with its sign (t1 < t0: negative), and the first evaluation, which
    first-same-as-last solvers can reuse as their first stage.

    Two evaluations of the vector field, counted in `nfe`. diffrax's own selection is skipped for
    wrapped terms (it then starts every solve with a step of 0.01), so probflow does it here.
    Both evaluations run in one loop body, so a network is traced and compiled once for them,
    not twice (a third less compilation for a U-Net's likelihood solve, docs/benchmarks.md).
    """
    leaves = lambda tree: jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])
    y = leaves(y0)
    direction = jnp.where(t1 > t0, 1.0, -1.0).astype(y.dtype)
    span = jnp.abs(t1 - t0)
    scale = atol + jnp.abs(y) * rtol
    rms = lambda v: jnp.sqrt(jnp.mean(jnp.square(v / scale)))

    def first_guess(f0):
        d0, d1 = rms(y), rms(leaves(f0))
        h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
        # Unlike the textbook rule, never probe outside [t0, t1]: the SDE may not exist there.
        return jnp.minimum(h0, span), d1

    def evaluate(i, fs):
        # i = 0: F(t0, y0); i = 1: F at the explicit Euler step of size h0 from it.
        f0, _ = fs
        h0, _ = first_guess(f0)
        second = i == 1
        t = jnp.where(second, t0 + direction * h0, t0)
        y_i = jax.tree_util.tree_map(
            lambda a, f: jnp.where(second, a + direction * h0 * f, a), y0, f0
        )
        f = jax.tree_util.tree_map(lambda v, a: v.astype(a.dtype), vector_field(t, y_i, None), y0)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(second, a, b), f0, f), f

    zeros = jax.tree_util.tree_map(jnp.zeros_like, y0)
    f0, f1 = jax.lax.fori_loop(0, 2, evaluate, (zeros, zeros))
    h0, d1 = first_guess(f0)
    d2 = rms(leaves(f1) - leaves(f0)) / h0
    max_d = jnp.maximum(d1, d2)
    h1 = jnp.where(
        max_d <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(max_d, 1e-30)) ** (1 / order),
    )
    h = jnp.minimum(jnp.minimum(100 * h0, h1), span)
    h = jnp.where(jnp.isfinite(h) & (h > 0), h, 1e-6)
    return jax.lax.stop_gradient(direction * h).astype(y.dtype), f0


def count_evaluations(
    solver, num_steps: ArrayLike, first_step_attempts: ArrayLike, *, adaptive: bool,
    sde: bool = False,
) -> Array:
    """Score-model evaluations of one solve that attempted `num_steps` steps, of which the
    first `first_step_attempts` were attempts at the first step (the rejected ones and the
    accepted one; 1 for a fixed-step solve, see `FirstStepCountingController`).

    **Arguments:**

    - `solver`: the diffrax or probflow solver of the solve.
    - `num_steps`: the steps it attempted (diffrax's `stats["num_steps"]`).
    - `first_step_attempts`: the attempts at the first step, the accepted one included.
    - `adaptive`: add probflow's initial step-size selection (2 evaluations; ODE solves).
    - `sde`: a reverse-SDE solve (the solver's SDE costs).
    """
    costs = solver_traits(solver, sde=sde).costs
    return evaluations(costs, num_steps, first_step_attempts, adaptive=adaptive)


def evaluations(
    costs: Costs, num_steps: ArrayLike, first_step_attempts: ArrayLike, *, adaptive: bool
) -> Array:
    """`count_evaluations` from a plan's `SolverTraits.costs` (what the solves call)."""
    num_steps = jnp.asarray(num_steps, jnp.int32)
    first = jnp.clip(jnp.asarray(first_step_attempts, jnp.int32), 0, num_steps)
    init, on_first, later = costs
    nfe = init + on_first * first + later * (num_steps - first)
    if adaptive:
        nfe = nfe + 2
    return nfe.astype(jnp.int32)


class FirstStepCountingController(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive step-size controller that also counts the attempts at the first step.

    diffrax keeps the solver state (with FSAL's first-step flag) only on accepted steps, so a
    retried first step pays every stage again; the controller state is kept on every attempt, so
    it can count them. State: (inner state, accepted yet, attempts up to the first acceptance).
    """

    controller: diffrax.AbstractAdaptiveStepSizeController

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self) -> Callable:
        return self.controller.norm

    def wrap(self, direction):
        inner = self.controller.wrap(direction)
        return FirstStepCountingController(inner)  # pyright: ignore[reportCallIssue]

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        tnext, state = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return tnext, (state, jnp.asarray(False), jnp.asarray(0, jnp.int32))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        inner, accepted, attempts = state
        keep, tprev, tnext, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        attempts = attempts + jnp.where(accepted, 0, 1).astype(jnp.int32)
        accepted = accepted | jnp.asarray(keep)
        return keep, tprev, tnext, made_jump, (inner, accepted, attempts), result


def first_step_attempts(controller_state) -> Int[Array, ""]:
    """The attempts at the first step recorded in a `FirstStepCountingController`'s state."""
    return controller_state[2]
