"""The probability-flow ODE (Song et al. 2021, eq. 13) solved with diffrax: the term, one
solve of one example (`solve_flow`), and encode / decode / sample_ode.

Every public function here validates its arguments in Python, then calls one `eqx.filter_jit`-ed
function that vmaps a single-example `diffrax.diffeqsolve` over the batch. Each example is solved
with its own adaptive step sizes, so a result never depends on what else is in the batch, and
`nfe` is counted per example (see `_nfe.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PRNGKeyArray

from ._divergence import (
    DIVERGENCE_MODES,
)
from ._dpm import AbstractExponentialIntegrator
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
    count_evaluations,
    error_order,
    first_step_attempts,
    select_initial_step,
)
from ._options import ODEOptions, make_ode_options
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

_DIVERGENCE_MODES = DIVERGENCE_MODES


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
    returns (y1, nfe, num_steps, failure). The solve runs in `opts.clock`, on `opts.schedule`'s
    times when it has fixed steps.

    A solve that fails comes back as a `_failures.Failure` (code and t), raised in Python by the
    caller: it stops at the first non-finite state (`GuardedController`, `FixedSteps`), where the
    step size collapses, or at max_steps.
    """
    dtype = jax.tree_util.tree_leaves(y0)[0].dtype
    solver = opts.solver
    clock = opts.clock
    ts = None
    if opts.schedule is not None:
        ts = opts.schedule.clock_times(sde, clock, t0, t1, opts.steps, dtype)
    # Solve in the clock c: dy/dc = F(t(c), y) dt/dc (see _time.py).
    vector_field = clock.wrap(vector_field, sde)
    t0, t1 = clock.static_to_clock(sde, t0), clock.static_to_clock(sde, t1)
    if isinstance(solver, AbstractExponentialIntegrator):
        solver = solver.bind(sde, clock, opts.steps)
    term = diffrax.ODETerm(vector_field)
    if opts.adaptive:
        # The wrapper counts the attempts at the first step, which FSAL solvers pay in full.
        dt0, _ = select_initial_step(vector_field, y0, t0, t1, opts.rtol, opts.atol,
                                     error_order(solver, term))
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
    # StepTo accepts every step: one attempt at the first.
    first = first_step_attempts(sol.controller_state) if opts.adaptive else 1
    nfe = count_evaluations(opts.solver, num_steps, first, adaptive=opts.adaptive)
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


@eqx.filter_jit
def _encode(model, sde, x, eps, opts):
    check_model(model, x.shape[1:], x.dtype)
    vf = ProbabilityFlowODE(model, sde)
    z, nfe, num_steps, failure = jax.vmap(
        lambda xi: solve_flow(vf, xi, eps, sde.T, opts, sde=sde)
    )(x)
    return z, nfe, num_steps, input_failure(x, eps) | failure


@eqx.filter_jit
def _decode(model, sde, z, eps, opts):
    check_model(model, z.shape[1:], z.dtype)
    vf = ProbabilityFlowODE(model, sde)
    x, nfe, num_steps, failure = jax.vmap(
        lambda zi: solve_flow(vf, zi, sde.T, eps, opts, sde=sde)
    )(z)
    return x, nfe, num_steps, input_failure(z, sde.T) | failure


def encode(
    model: Callable,
    sde: AbstractSDE,
    x: ArrayLike,
    *,
    eps: float = 1e-3,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    max_steps: int = 16384,
    time: str | AbstractClock = "t",
    schedule: str | AbstractStepSchedule | None = None,
) -> EncodeResult:
    """Latents z = x(T) of a batch `x`, solving the probability-flow ODE from eps to T.

    `time="log_snr"` solves the ODE in lambda = log(scale / std) instead of t (same nfe counting).
    With `steps=N`, `schedule` lays the N steps (`pf.EDMSchedule()`, "edm", or uniform in a
    clock; None: the exponential integrator's own, else uniform in sqrt(t) for time="t" and in
    the solve's clock otherwise).
    """
    sde, eps, x = _check_flow_inputs(model, sde, x, eps)
    opts = make_ode_options(solver, rtol, atol, steps, max_steps, time, schedule)
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
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    max_steps: int = 16384,
    time: str | AbstractClock = "t",
    schedule: str | AbstractStepSchedule | None = None,
) -> DecodeResult:
    """Data x = x(eps) from a batch of latents `z`, solving the ODE from T back to eps.

    `time="log_snr"` solves the ODE in lambda = log(scale / std) instead of t (same nfe counting).
    With `steps=N`, `schedule` lays the N steps (`pf.EDMSchedule()`, "edm", or uniform in a
    clock; None: the exponential integrator's own, else uniform in sqrt(t) for time="t" and in
    the solve's clock otherwise).
    """
    sde, eps, z = _check_flow_inputs(model, sde, z, eps, name="z")
    opts = make_ode_options(solver, rtol, atol, steps, max_steps, time, schedule)
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
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    max_steps: int = 16384,
    dtype=None,
    time: str | AbstractClock = "t",
    schedule: str | AbstractStepSchedule | None = None,
) -> SampleResult:
    """`num_samples` samples of the given example `shape`: prior draws decoded by the ODE."""
    sde = check_sde(sde)
    num_samples = check_positive_int(num_samples, "num_samples")
    shape = check_shape(shape)
    dtype = jnp.result_type(float) if dtype is None else dtype
    keys = jax.random.split(key, num_samples)
    z = jax.vmap(lambda k: sde.prior_sample(k, shape, dtype))(keys)
    r = decode(
        model, sde, z, eps=eps, solver=solver, rtol=rtol, atol=atol, steps=steps,
        max_steps=max_steps, time=time, schedule=schedule,
    )
    return SampleResult(x=r.x, nfe=r.nfe, num_steps=r.num_steps)


