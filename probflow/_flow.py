"""The probability-flow ODE (Song et al. 2021, eq. 13) solved with diffrax: the term, one
solve of one example (`solve_flow`), and encode / decode / sample_ode.

Every public function here validates its arguments in Python, then calls one jitted function
(`_program_store.stored_jit`: `eqx.filter_jit`, kept on disk when a store is open) that vmaps a
single-example `diffrax.diffeqsolve` over the batch. Each example is solved with its own
adaptive step sizes, so a result never depends on what else is in the batch, and `nfe` is
counted per example (see `_nfe.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PRNGKeyArray

from ._failures import (
    Failure,
    FixedSteps,
    GuardedController,
    code_of_result,
    input_failure,
    raise_if_failed,
)
from ._nfe import (
    FirstStepCountingController,
    evaluations,
    first_step_attempts,
    select_initial_step,
)
from ._options import ODEOptions, Refill, ode_options
from ._program_store import stored_jit
from ._refill import refill_solve
from ._results import (
    DecodeResult,
    EncodeResult,
    SampleResult,
)
from ._sde import AbstractSDE
from ._time import (
    AbstractClock,
    AbstractStepSchedule,
)
from ._validate import (
    as_float_batch,
    check_eps,
    check_model,
    check_positive_int,
    check_sde,
    check_shape,
)


class ProbabilityFlowODE(eqx.Module):
    """dx/dt = f(t) x - 1/2 g(t)^2 score(t, x), eq. (13), as a diffrax vector field."""

    model: Callable
    sde: AbstractSDE

    def __call__(self, t, y, args):
        del args
        g2 = self.sde.diffusion(t) ** 2
        out = self.sde.drift_coef(t) * y - 0.5 * g2 * self.model(t, y)
        return out.astype(y.dtype)


def solve_flow(vector_field, y0, t0: float, t1: float, opts: ODEOptions, *, sde: AbstractSDE):
    """One diffrax solve of one example from t0 to t1 of the probability-flow ODE of `sde`;
    returns (y1, nfe, num_steps, failure). The solve runs in `opts.time`, on `opts.schedule`'s
    times when it has fixed steps; the solver's facts come from `opts.traits`.

    A solve that fails comes back as a `_failures.Failure` (code and t), raised in Python by the
    caller: it stops at the first non-finite state (`GuardedController`, `FixedSteps`), where the
    step size collapses, or at max_steps.
    """
    dtype = jax.tree_util.tree_leaves(y0)[0].dtype
    solver = opts.solver
    clock = opts.time
    ts = None
    if opts.schedule is not None and opts.steps is not None:  # a fixed-step plan has both
        ts = opts.schedule.clock_times(sde, clock, t0, t1, opts.steps, dtype)
    # Solve in the clock c: dy/dc = F(t(c), y) dt/dc (see _time.py).
    vector_field = clock.wrap(vector_field, sde)
    t0, t1 = clock.static_to_clock(sde, t0), clock.static_to_clock(sde, t1)
    if opts.traits.needs_binding:
        solver = solver.bind(sde, clock, opts.steps)  # pyright: ignore[reportAttributeAccessIssue]
    term = diffrax.ODETerm(vector_field)
    if opts.adaptive:
        # The wrapper counts the attempts at the first step, which FSAL solvers pay in full.
        dt0, _ = select_initial_step(vector_field, y0, t0, t1, opts.rtol, opts.atol,
                                     opts.traits.step_order)
        pid = diffrax.PIDController(rtol=opts.rtol, atol=opts.atol)
        # (pyright reads diffrax's abstract rtol/atol/norm as constructor fields)
        controller = GuardedController(  # pyright: ignore[reportCallIssue]
            FirstStepCountingController(pid), dt0  # pyright: ignore[reportCallIssue]
        )
    else:
        controller = FixedSteps(ts)  # pyright: ignore[reportArgumentType]
    sol = diffrax.diffeqsolve(
        term,
        solver,
        t0=jnp.asarray(t0, dtype),
        t1=jnp.asarray(t1, dtype),
        dt0=None,
        y0=y0,
        saveat=diffrax.SaveAt(t1=True, controller_state=opts.adaptive),
        stepsize_controller=controller,
        max_steps=opts.max_steps,
        throw=False,
    )
    y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
    num_steps = sol.stats["num_steps"]
    # FixedSteps accepts every finite step: one attempt at the first.
    first = first_step_attempts(sol.controller_state) if opts.adaptive else 1
    nfe = evaluations(opts.traits.costs, num_steps, first, adaptive=opts.adaptive)
    t_end = clock.to_time(sde, sol.ts[-1])  # pyright: ignore[reportOptionalSubscript]
    failure = Failure(code_of_result(sol.result), t_end)  # pyright: ignore[reportArgumentType]
    return y1, nfe, num_steps, failure


def _check_flow_inputs(model, sde, x, eps, name="x"):
    # The model itself is checked inside the jitted functions (`check_model`), so that the check
    # runs once per trace rather than on every call.
    sde = check_sde(sde)
    eps = check_eps(eps, sde)
    x = as_float_batch(x, name)
    if not callable(model):
        raise ValueError(f"model must be a callable model(t, x) -> score, got {type(model)}")
    return sde, eps, x


# --------------------------------------------------------------------------- encode / decode


def _solve_batch(model, sde, y0, t0: float, t1: float, opts: ODEOptions):
    """Every example's solve of the ODE from t0 to t1, in lockstep (a vmapped `solve_flow`) or
    refilled (`refill_solve`), as the plan's scheduler says."""
    vf = ProbabilityFlowODE(model, sde)
    if isinstance(opts.scheduler, Refill):
        return refill_solve(
            lambda _: vf, y0, jnp.zeros(y0.shape[:1], y0.dtype), t0, t1, opts, sde=sde
        )
    return jax.vmap(lambda y: solve_flow(vf, y, t0, t1, opts, sde=sde))(y0)


@stored_jit
def _encode(model, sde, x, eps, opts):
    check_model(model, x.shape[1:], x.dtype)
    z, nfe, num_steps, failure = _solve_batch(model, sde, x, eps, sde.T, opts)
    return z, nfe, num_steps, input_failure(x, eps) | failure


@stored_jit
def _decode(model, sde, z, eps, opts):
    check_model(model, z.shape[1:], z.dtype)
    x, nfe, num_steps, failure = _solve_batch(model, sde, z, sde.T, eps, opts)
    return x, nfe, num_steps, input_failure(z, sde.T) | failure


def _flow_options(options, solver, rtol, atol, steps, max_steps, time, schedule, shape):
    opts = ode_options(options, solver=solver, rtol=rtol, atol=atol, steps=steps,
                       max_steps=max_steps, time=time, schedule=schedule)
    return opts.for_examples(math.prod(shape))


def encode(
    model: Callable,
    sde: AbstractSDE,
    x: ArrayLike,
    *,
    eps: float = 1e-3,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int | None = None,
    time: str | AbstractClock | None = None,
    schedule: str | AbstractStepSchedule | None = None,
    options: ODEOptions | None = None,
) -> EncodeResult:
    """Latents z = x(T) of a batch `x`, solving the probability-flow ODE (eq. 13) from eps to T.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE (`pf.VPSDE`, `pf.SubVPSDE`, `pf.VESDE`).
    - `x`: a batch of data [B, ...].
    - `eps`: the smallest time, where the solve starts (default 1e-3).
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`, `time`, `schedule`: the solve plan's
      settings, as in `pf.ODEOptions` (which owns their defaults); not given (None): the
      default.
    - `options`: a `pf.ODEOptions` plan instead of the keywords above (both at once:
      ValueError); with `scheduler=pf.Refill(S)` an adaptive batch is solved S examples at a
      time, each example's result that of its own solve, at the batch's mean NFE.

    **Returns:** `EncodeResult` with `z` [B, ...], `nfe` [B] and `num_steps` [B].
    """
    sde, eps, x = _check_flow_inputs(model, sde, x, eps)
    opts = _flow_options(options, solver, rtol, atol, steps, max_steps, time, schedule,
                         x.shape[1:])
    z, nfe, num_steps, failure = _encode(model, sde, x, eps, opts)
    raise_if_failed(failure, what="ODE solve (encode)", direction=1, max_steps=opts.max_steps)
    return EncodeResult(z=z, nfe=nfe, num_steps=num_steps)


def decode(
    model: Callable,
    sde: AbstractSDE,
    z: ArrayLike,
    *,
    eps: float = 1e-3,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int | None = None,
    time: str | AbstractClock | None = None,
    schedule: str | AbstractStepSchedule | None = None,
    options: ODEOptions | None = None,
) -> DecodeResult:
    """Data x = x(eps) from a batch of latents `z`, solving the ODE (eq. 13) from T back to eps.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `z`: a batch of latents [B, ...] (the state at time T).
    - `eps`: the smallest time, where the solve ends (default 1e-3).
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`, `time`, `schedule`: the solve plan's
      settings, as in `pf.ODEOptions` (which owns their defaults); not given (None): the
      default.
    - `options`: a `pf.ODEOptions` plan instead of the keywords above (both at once:
      ValueError); with `scheduler=pf.Refill(S)` an adaptive batch is solved S examples at a
      time, each example's result that of its own solve, at the batch's mean NFE.

    **Returns:** `DecodeResult` with `x` [B, ...], `nfe` [B] and `num_steps` [B].
    """
    sde, eps, z = _check_flow_inputs(model, sde, z, eps, name="z")
    opts = _flow_options(options, solver, rtol, atol, steps, max_steps, time, schedule,
                         z.shape[1:])
    x, nfe, num_steps, failure = _decode(model, sde, z, eps, opts)
    raise_if_failed(failure, what="ODE solve (decode)", direction=-1, max_steps=opts.max_steps,
                    name="z")
    return DecodeResult(x=x, nfe=nfe, num_steps=num_steps)


def sample_ode(
    model: Callable,
    sde: AbstractSDE,
    num_samples: int,
    shape: tuple[int, ...],
    *,
    key: PRNGKeyArray,
    eps: float = 1e-3,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int | None = None,
    dtype=None,
    time: str | AbstractClock | None = None,
    schedule: str | AbstractStepSchedule | None = None,
    options: ODEOptions | None = None,
) -> SampleResult:
    """`num_samples` samples of the given example `shape`: prior draws decoded by the ODE.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `num_samples`: how many samples.
    - `shape`: the shape of one example.
    - `key`: the PRNG key of the prior draws.
    - `eps`: the smallest time, where the solve ends (default 1e-3).
    - `dtype`: the samples' dtype (default: JAX's default float).
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`, `time`, `schedule`: the solve plan's
      settings, as in `pf.ODEOptions` (which owns their defaults); not given (None): the
      default.
    - `options`: a `pf.ODEOptions` plan instead of the keywords above (both at once:
      ValueError); with `scheduler=pf.Refill(S)` an adaptive batch is solved S examples at a
      time, each example's result that of its own solve, at the batch's mean NFE.

    **Returns:** `SampleResult` with `x` [num_samples, ...], `nfe` and `num_steps`.
    """
    sde = check_sde(sde)
    num_samples = check_positive_int(num_samples, "num_samples")
    shape = check_shape(shape)
    opts = _flow_options(options, solver, rtol, atol, steps, max_steps, time, schedule, shape)
    dtype = jnp.result_type(float) if dtype is None else dtype
    keys = jax.random.split(key, num_samples)
    z = jax.vmap(lambda k: sde.prior_sample(k, shape, dtype))(keys)
    r = decode(model, sde, z, eps=eps, options=opts)
    return SampleResult(x=r.x, nfe=r.nfe, num_steps=r.num_steps)

