"""Failures of compiled solves: result codes inside `jit`, one-line errors raised in Python.

No host callback runs inside a compiled solve or sampler (JAX's persistent compilation cache
cannot store a program that holds one, and an `eqx.error_if` is one). Instead every jitted
function returns, per example, a `Failure`: an int32 code and the time t at which it happened;
the public function hands it to `raise_if_failed`, which raises one exception with a one-line
message (`SolveError`, or `ValueError` for bad input values).

Inside diffrax solves, `GuardedController` (adaptive steps) and `FixedSteps` (given times) end
a solve at the first attempted step whose state is non-finite (`RESULTS.breakdown`), rather than
after `max_steps` rejected steps, and `GuardedController` ends one whose step size has collapsed
below the resolution of t (`RESULTS.dt_min_reached`), which could never finish.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = [
    "BAD_INPUT",
    "MAX_STEPS",
    "NONFINITE",
    "OK",
    "STALLED",
    "Failure",
    "FixedSteps",
    "GuardedController",
    "SolveError",
    "code_of_result",
    "input_failure",
    "raise_if_failed",
]

# The result codes, per example (0: success). A failure keeps the first code it got.
OK = 0
MAX_STEPS = 1  # max_steps reached before the end of the solve
NONFINITE = 2  # the state or the score became NaN or inf
STALLED = 3  # the step size collapsed below the resolution of t
BAD_INPUT = 4  # the input example holds NaN or inf values


class SolveError(RuntimeError):
    """A solve or sampler could not finish: the state or the score became non-finite, the step
    size collapsed, or `max_steps` was reached. The message is one line naming the time t and
    how many examples failed."""


class Failure(eqx.Module):
    """Per example: `code` (int32, `OK` = 0 for success) and `t`, the time at which the failure
    happened (the start of the step whose state was non-finite, where the step size collapsed,
    or where `max_steps` ran out)."""

    code: Int[Array, "*batch"]
    t: Float[Array, "*batch"]

    def __or__(self, other: Failure) -> Failure:
        """The first failure of the two (this one, unless it is a success)."""
        ok = self.code == OK
        return Failure(jnp.where(ok, other.code, self.code), jnp.where(ok, other.t, self.t))


def code_of_result(result) -> Int[Array, ""]:
    """The code of a diffrax result (`GuardedController` and `FixedSteps` report a non-finite
    state as `breakdown` and a collapsed step size as `dt_min_reached`)."""
    r = diffrax.RESULTS
    code = jnp.where(result == r.max_steps_reached, MAX_STEPS, NONFINITE)
    code = jnp.where(result == r.dt_min_reached, STALLED, code)
    return jnp.where(result == r.successful, OK, code).astype(jnp.int32)


def input_failure(x: Array, t: float) -> Failure:
    """`BAD_INPUT` for each example (leading axis) of `x` holding NaN or inf values."""
    finite = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    code = jnp.where(finite, OK, BAD_INPUT).astype(jnp.int32)
    return Failure(code, jnp.full(code.shape, t, x.dtype))


def all_finite(tree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jtu.tree_leaves(tree)]))


class GuardedController(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive controller that ends a solve at its first non-finite candidate state
    (`RESULTS.breakdown`; the wrapped controller would only reject it, again and again until
    `max_steps`) and where the next step would be below the resolution of t
    (`RESULTS.dt_min_reached`: 16 ulps of t, so the solve could never finish). Accepted steps
    are the wrapped controller's, bit for bit.

    `dt0` is the first (signed) step size, handed to the wrapped controller here rather than to
    `diffeqsolve`, whose check of a traced `dt0` is a host callback.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController
    dt0: Array | None = None

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        dt0 = None if self.dt0 is None else self.dt0 * direction
        # (pyright reads diffrax's abstract rtol/atol/norm as constructor fields)
        return GuardedController(  # pyright: ignore[reportCallIssue]
            self.controller.wrap(direction), dt0
        )

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        dt0 = self.dt0 if dt0 is None else dt0
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        keep, tprev, tnext, made_jump, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, state
        )
        finite = all_finite(y1_candidate)
        keep = keep & finite
        tprev = jnp.where(finite, tprev, t0)
        resolution = 16 * jnp.finfo(jnp.result_type(tprev)).eps * jnp.abs(tprev)
        stalled = (tnext - tprev) <= resolution
        result = diffrax.RESULTS.where(stalled, diffrax.RESULTS.dt_min_reached, result)
        result = diffrax.RESULTS.where(
            finite, result, diffrax.RESULTS.breakdown  # pyright: ignore[reportArgumentType]
        )
        return keep, tprev, tnext, made_jump, state, result


class FixedSteps(diffrax.AbstractStepSizeController):
    """Steps to the given times (diffrax's `StepTo`, whose checks of `ts` are host callbacks;
    probflow's schedules are strictly monotone by construction), ending the solve at the first
    non-finite state (`RESULTS.breakdown`, with t the start of that step)."""

    ts: Array

    def wrap(self, direction):
        return FixedSteps(self.ts * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        del terms, t0, t1, y0, args, func, error_order
        if dt0 is not None:
            raise ValueError("FixedSteps takes its step times from ts: pass dt0=None")
        return self.ts[1], jnp.asarray(2, jnp.int32)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        del y0, args, y_error, error_order
        finite = all_finite(y1_candidate)
        result = diffrax.RESULTS.where(
            finite, diffrax.RESULTS.successful,
            diffrax.RESULTS.breakdown,  # pyright: ignore[reportArgumentType]
        )
        tprev = jnp.where(finite, t1, t0)
        return finite, tprev, self.ts[state], False, state + 1, result


# --------------------------------------------------------------------------- raising, in Python


def _first_time(t: np.ndarray, direction: int) -> float:
    """The earliest of the times `t` in the order the solve runs (`direction` +1: t rises)."""
    return float(np.min(t) if direction > 0 else np.max(t))


def raise_if_failed(
    failure: Failure, *, what: str, direction: int, max_steps: int | None = None,
    name: str = "x",
) -> None:
    """Raise one exception with a one-line message if any example failed, else return.

    `what` names the solve ("ODE solve", "reverse-SDE solve", "predictor-corrector sampling"),
    `direction` its direction in t (+1 from eps up to T, -1 down), `name` the input argument.
    Bad input values come first (`ValueError`), then non-finite values, a collapsed step size,
    and `max_steps` (`SolveError`).
    """
    code = np.asarray(failure.code).reshape(-1)
    if not np.any(code != OK):
        return
    t = np.asarray(failure.t, np.float64).reshape(-1)
    n = code.size

    def where(c):
        bad = code == c
        return int(np.sum(bad)), _first_time(t[bad], direction) if np.any(bad) else 0.0

    count, _ = where(BAD_INPUT)
    if count:
        raise ValueError(
            f"{name} contains NaN or inf values in {count} of {n} examples; pass finite data"
        )
    count, at = where(NONFINITE)
    if count:
        raise SolveError(
            f"the {what} produced non-finite values at t={at:.6g} in {count} of {n} examples; "
            "check that the model returns finite scores (and its weights are finite)"
        )
    count, at = where(STALLED)
    if count:
        raise SolveError(
            f"the {what} cannot finish: its step size collapsed at t={at:.6g} in {count} of {n} "
            "examples; the model's score changes too fast to integrate (check its weights), or "
            "eps is too small for this model"
        )
    count, at = where(MAX_STEPS)
    limit = "" if max_steps is None else f"={max_steps}"
    raise SolveError(
        f"the {what} reached max_steps{limit} at t={at:.6g} in {count} of {n} examples before "
        "finishing; raise max_steps or loosen rtol/atol"
    )


def no_failure(shape, dtype=None) -> Failure:
    """Success for every example of a batch of `shape`."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    return Failure(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, dtype))

