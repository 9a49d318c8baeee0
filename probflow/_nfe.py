"""Honest NFE: how many score-model evaluations a diffrax solve spent.

diffrax reports solver steps, not evaluations. The count here follows diffrax's own
implementation (verified against a host-side counter in the tests):

- explicit Runge--Kutta with s stages: s evaluations per attempted step (accepted or rejected);
  first-same-as-last (FSAL) tableaus reuse the last stage, so s - 1 on every step after the first;
- Euler and LeapfrogMidpoint: 1 per step; ReversibleHeun: 1 per step plus 1 at initialisation;
- adaptive solves: 2 more evaluations for the initial step-size selection (Hairer, Norsett &
  Wanner, II.4), which probflow performs itself (`_ode.select_initial_step`).
"""

from __future__ import annotations

import abc

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int


class AbstractCountedSolver(eqx.Module):
    """A probflow solver that states its own evaluation count (mixed into diffrax solvers)."""

    @abc.abstractmethod
    def count_evaluations(self, num_steps: Int[Array, ""]) -> Int[Array, ""]:
        """Score evaluations of a solve with `num_steps` steps (no step-size selection)."""


_SUPPORTED = (
    "explicit Runge-Kutta solvers (Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, "
    "Dopri8), ReversibleHeun, LeapfrogMidpoint and probflow's DPMSolver/DPMSolverMultistep"
)


def _per_step(solver) -> tuple[int, int, int]:
    """(evaluations at init, on the first step, on every later step)."""
    if isinstance(solver, diffrax.Euler):
        return 0, 1, 1
    if isinstance(solver, diffrax.LeapfrogMidpoint):
        return 0, 1, 1
    if isinstance(solver, diffrax.ReversibleHeun):
        return 1, 1, 1
    if isinstance(solver, diffrax.AbstractRungeKutta):
        tableau = solver.tableau
        if isinstance(tableau, diffrax.ButcherTableau) and not tableau.implicit:
            stages = len(tableau.c) + 1
            return 0, stages, stages - 1 if tableau.fsal else stages
    raise ValueError(
        f"solver={type(solver).__name__} is not supported: probflow counts score evaluations "
        f"exactly and knows how for {_SUPPORTED}"
    )


def check_ode_solver(solver) -> None:
    """Raise a clear error for solvers whose evaluations cannot be counted."""
    if isinstance(solver, AbstractCountedSolver):
        return
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"solver must be a diffrax solver, got {type(solver).__name__}")
    _per_step(solver)


def count_evaluations(solver, num_steps: Array, *, adaptive: bool) -> Array:
    """Score-model evaluations of one solve that attempted `num_steps` steps."""
    num_steps = jnp.asarray(num_steps, jnp.int32)
    if isinstance(solver, AbstractCountedSolver):
        nfe = solver.count_evaluations(num_steps)
    else:
        init, first, later = _per_step(solver)
        nfe = init + jnp.where(num_steps > 0, first + (num_steps - 1) * later, 0)
    if adaptive:
        nfe = nfe + 2
    return nfe.astype(jnp.int32)
