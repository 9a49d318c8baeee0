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

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int

# (at initialisation, per attempt before the first accepted step, per later attempt)
Costs = tuple[int, int, int]


class AbstractCountedSolver(eqx.Module):
    """A probflow solver that states its own evaluation costs (mixed into diffrax solvers)."""

    @abc.abstractmethod
    def evaluation_costs(self) -> Costs:
        """Score evaluations (at initialisation, per attempt at the first step, per later
        attempt), without the step-size selection."""

    @property
    def supports_adaptive(self) -> bool:
        """Whether the solver has an error estimate (can run with steps=None)."""
        return False


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
# SDE solvers with an error estimate that diffrax accepts for adaptive SDE solves.
ADAPTIVE_SDE_SOLVERS = (diffrax.Heun, diffrax.ReversibleHeun, diffrax.SRA1, diffrax.ShARK,
                        diffrax.SPaRK)


def _tableau_costs(solver) -> Costs | None:
    if isinstance(solver, diffrax.AbstractRungeKutta):
        tableau = solver.tableau
        if isinstance(tableau, diffrax.ButcherTableau) and not tableau.implicit:
            stages = len(tableau.c) + 1
            return 0, stages, stages - 1 if tableau.fsal else stages
    return None


def solver_costs(solver, *, sde: bool = False) -> Costs:
    """(evaluations at init, per attempt at the first step, per later attempt) of `solver` in an
    ODE solve, or with `sde=True` in a reverse-SDE solve: the one cost table of every family."""
    if sde:
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
    if isinstance(solver, AbstractCountedSolver):
        return solver.evaluation_costs()
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
            init, first, later = solver_costs(solver.solver)
        except ValueError:
            raise ValueError(
                f"solver=HalfSolver({type(solver.solver).__name__}) is not supported: probflow "
                f"counts score evaluations exactly and knows how for {_SUPPORTED}"
            ) from None
        # The full step and the first half step start from the step's solver state; the second
        # half step from the first half step's (after which FSAL is available).
        return init, 2 * first + later, 3 * later
    entry = _COSTS.get(type(solver))
    costs = entry[0] if entry is not None and entry[1] else _tableau_costs(solver)
    if costs is None:
        raise ValueError(
            f"solver={type(solver).__name__} is not supported: probflow counts score evaluations "
            f"exactly and knows how for {_SUPPORTED}"
        )
    return costs


def has_error_estimate(solver, *, sde: bool = False) -> bool:
    """Whether `solver` can choose its own steps: the one capability check of every family
    (diffrax ODE solvers, probflow's exponential integrators, diffrax SDE solvers)."""
    if sde:
        return isinstance(solver, ADAPTIVE_SDE_SOLVERS)
    if isinstance(solver, AbstractCountedSolver):
        return solver.supports_adaptive
    if isinstance(solver, diffrax.HalfSolver):  # first: isinstance sees through wrappers
        return True
    if isinstance(solver, (diffrax.Euler, diffrax.LeapfrogMidpoint)):
        return False
    if isinstance(solver, diffrax.AbstractRungeKutta):
        return solver.tableau.b_error is not None and bool(
            any(float(b) != 0.0 for b in solver.tableau.b_error)
        )
    return True


def error_order(solver, terms) -> float:
    """diffrax's own error order (as its controller uses it; HalfSolver: order + 1)."""
    order = solver.error_order(terms)
    return 2.0 if order is None else float(order)


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


def check_ode_solver(solver) -> None:
    """Raise a clear error for solvers whose evaluations cannot be counted."""
    if not isinstance(solver, (diffrax.AbstractSolver, AbstractCountedSolver)):
        raise ValueError(f"solver must be a diffrax solver, got {type(solver).__name__}")
    solver_costs(solver)


def count_evaluations(
    solver, num_steps: ArrayLike, first_step_attempts: ArrayLike, *, adaptive: bool,
    sde: bool = False,
) -> Array:
    """Score-model evaluations of one solve that attempted `num_steps` steps, of which the
    first `first_step_attempts` were attempts at the first step (the rejected ones and the
    accepted one; 1 for a fixed-step solve, see `FirstStepCountingController`). `adaptive`: add
    probflow's initial step selection (ODE solves); `sde`: an SDE solve (its `solver_costs`)."""
    num_steps = jnp.asarray(num_steps, jnp.int32)
    first = jnp.clip(jnp.asarray(first_step_attempts, jnp.int32), 0, num_steps)
    init, on_first, later = solver_costs(solver, sde=sde)
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
        return FirstStepCountingController(self.controller.wrap(direction))

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
