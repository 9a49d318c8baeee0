"""What the few-step multistep integrators (UniPC, iPNDM, DEIS) share: a history of model outputs,
the phi functions of exponential integrators, and the rule that they solve the plain
probability-flow ODE only.

All of them are `AbstractExponentialIntegrator`s (bound to the SDE by the solve, stepping on their
schedule's times, honest `nfe`): one model evaluation per step, at the step's start, the earlier
ones carried in the solver state.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from ._time import AbstractStepSchedule, as_schedule


def step_schedule(schedule) -> AbstractStepSchedule:
    """The step schedule of a fixed-step solve from a schedule or its name (not None)."""
    out = as_schedule(schedule)
    if out is None:
        raise ValueError("schedule must be one of the schedule names or a step schedule, got None")
    return out


def plain_state(y0, solver_name: str):
    """The state x of a plain solve; the likelihood ODE's (x, delta) is not supported."""
    if isinstance(y0, tuple):
        raise ValueError(
            f"solver={solver_name} solves the probability-flow ODE for sampling, not the "
            "likelihood ODE: pass solver=pf.DPMSolverMultistep(...) or a diffrax solver to "
            "log_likelihood/bits_per_dim"
        )
    return y0


def push(hist, value):
    """The history with `value` in front and the oldest entry dropped."""
    return jnp.concatenate([value[None].astype(hist.dtype), hist[:-1]])


def phi(k: int, h):
    """phi_k(h) = (e^h - sum_{j<k} h^j / j!) / h^k (phi_0 = e^h), the coefficients of
    exponential integrators (Hochbruck & Ostermann 2010); by its Taylor series for |h| < 1, where
    the recursion phi_{k+1} = (phi_k - 1/k!) / h cancels catastrophically."""
    if k == 0:
        return jnp.exp(h)
    small = jnp.abs(h) < 1.0
    hs = jnp.where(small, h, 0.0)
    # For |h| < 1 the truncation error is below 1 / (18 + k)!.
    series = sum(hs**j * (1.0 / math.factorial(j + k)) for j in range(18))
    hl = jnp.where(small, 1.0, h)
    rec = jnp.exp(hl)
    for j in range(k):
        rec = (rec - 1.0 / math.factorial(j)) / hl
    return jnp.where(small, series, rec)
