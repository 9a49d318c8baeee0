"""The probability-flow ODE (Song et al. 2021, eq. 13) solved with diffrax.

Every public function here validates its arguments in Python, then calls one `eqx.filter_jit`-ed
function that vmaps a single-example `diffrax.diffeqsolve` over the batch. Each example is solved
with its own adaptive step sizes, so a result never depends on what else is in the batch, and
`nfe` is counted per example (see `_nfe.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PRNGKeyArray

from ._divergence import (
    DIVERGENCE_MODES,
    AbstractTraceEstimator,
    AugmentedProbabilityFlowODE,
    ExactTrace,
    GaussianControlVariate,
    GaussianTrace,
    make_trace_estimator,
)
from ._dpm import AbstractExponentialIntegrator
from ._nfe import (
    FirstStepCountingController,
    count_evaluations,
    error_order,
    first_step_attempts,
    raise_if_failed,
    select_initial_step,
)
from ._options import ODEOptions, make_ode_options
from ._refill import check_refill_solver, default_slots, refill_log_likelihood
from ._results import (
    BitsPerDimResult,
    DecodeResult,
    EncodeResult,
    LikelihoodResult,
    SampleResult,
)
from ._sde import VPSDE, AbstractSDE
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
    error_if_nonfinite,
)
from .data._dataset import to_model_space

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
    returns (y1, nfe, num_steps). The solve runs in `opts.clock`, on `opts.schedule`'s times
    when it has fixed steps.

    A solve that fails (max_steps reached, step size underflow, non-finite values) raises through
    `eqx.error_if` with a message that names the fix.
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
        controller = FirstStepCountingController(
            diffrax.PIDController(rtol=opts.rtol, atol=opts.atol)
        )
        dt0, _ = select_initial_step(vector_field, y0, t0, t1, opts.rtol, opts.atol,
                                     error_order(solver, term))
    else:
        controller = diffrax.StepTo(ts=ts)
        dt0 = None
    sol = diffrax.diffeqsolve(
        term,
        solver,
        t0=jnp.asarray(t0, dtype),
        t1=jnp.asarray(t1, dtype),
        dt0=dt0,
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
    y1 = raise_if_failed(y1, sol.result, opts.max_steps, "ODE")
    return y1, nfe, num_steps


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
    x = error_if_nonfinite(x, "x")
    vf = ProbabilityFlowODE(model, sde)
    return jax.vmap(lambda xi: solve_flow(vf, xi, eps, sde.T, opts, sde=sde))(x)


@eqx.filter_jit
def _decode(model, sde, z, eps, opts):
    check_model(model, z.shape[1:], z.dtype)
    z = error_if_nonfinite(z, "z")
    vf = ProbabilityFlowODE(model, sde)
    return jax.vmap(lambda zi: solve_flow(vf, zi, sde.T, eps, opts, sde=sde))(z)


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
    z, nfe, num_steps = _encode(model, sde, x, eps, opts)
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
    x, nfe, num_steps = _decode(model, sde, z, eps, opts)
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


# --------------------------------------------------------------------------- likelihoods


@eqx.filter_jit
def _log_likelihood(model, sde, x, keys, eps, opts, estimator, divergence_mode):
    check_model(model, x.shape[1:], x.dtype)
    x = error_if_nonfinite(x, "x")

    def one(xi, key):
        probes = estimator.draw(key, xi.shape, xi.dtype)
        vf = AugmentedProbabilityFlowODE(model, sde, probes, divergence_mode, estimator)
        # One divergence integral per probe, all from the same linearisations of the model.
        y0 = (xi, jnp.zeros((estimator.num_probes,), xi.dtype))
        (z, delta), nfe, num_steps = solve_flow(vf, y0, eps, sde.T, opts, sde=sde)
        # log p_eps(x) = log p_T(z) + int_eps^T div F dt  (appendix D)
        return sde.prior_logp(z) + delta, z, nfe, num_steps

    return jax.vmap(one)(x, keys)


def _check_likelihood_options(trace, num_probes, key, divergence_mode, control_variate, x):
    """The estimator object for the public options (strings become objects here, once)."""
    if not isinstance(trace, AbstractTraceEstimator):
        num_probes = check_positive_int(num_probes, "num_probes")
    estimator = make_trace_estimator(trace, num_probes, control_variate)
    if divergence_mode not in _DIVERGENCE_MODES:
        raise ValueError(
            f"divergence_mode must be one of {_DIVERGENCE_MODES}, got {divergence_mode!r}"
        )
    if key is None and not isinstance(estimator, ExactTrace):
        raise ValueError(f"key is required for trace={trace!r} (it draws the Hutchinson probes)")
    cv = estimator.control_variate if isinstance(estimator, GaussianTrace) else None
    if cv is not None and cv.variance.shape != x.shape[1:]:
        raise ValueError(
            f"control_variate.variance must have the example's shape {x.shape[1:]}, got "
            f"{cv.variance.shape}"
        )
    return estimator


def log_likelihood(
    model: Callable,
    sde: AbstractSDE,
    x: ArrayLike,
    *,
    key: PRNGKeyArray | None = None,
    trace: str | AbstractTraceEstimator = "rademacher",
    num_probes: int = 1,
    control_variate: GaussianControlVariate | None = None,
    eps: float = 1e-5,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    max_steps: int = 16384,
    divergence_mode: str = "jvp",
    time: str | AbstractClock = "t",
    schedule: str | AbstractStepSchedule | None = None,
    slots: int | None = None,
) -> LikelihoodResult:
    """log p_eps(x) in nats for a batch, by the ODE augmented with the divergence (appendix D).

    log p_eps(x) = sde.prior_logp(z) + int_eps^T div F(x(t), t) dt with z = x(T). The divergence is
    exact (`trace="exact"`, one push per dimension) or Hutchinson's estimate with `num_probes`
    probes, fixed for the whole solve and independent per example: `"rademacher"` (the default,
    the least noisy) or `"gaussian"` (on the whole drift's Jacobian, as the paper's code;
    `control_variate=pf.GaussianControlVariate.fit(data)` removes most of its extra noise). `trace`
    may also be an estimator object (`pf.RademacherTrace(num_probes)`, `pf.GaussianTrace`,
    `pf.ExactTrace()`). Each probe gets its own divergence integral from the same model
    evaluations: `r.logp_probes` [B, P], `r.logp` their mean, and the spread between them
    estimates the probe noise (`pf.summarize_bits_per_dim`). `time="log_snr"` solves in
    lambda-time; the exponential integrators (`pf.DPMSolver`, `pf.DPMSolverMultistep`) integrate
    the divergence alongside x (see `_dpm.py`).

    `slots=S` solves an adaptive batch S examples at a time, refilling a slot as soon as its
    example finishes (`_refill.py`): the batch then costs its mean NFE, not its largest, and each
    example's result and `nfe` are those of its own solve whatever else is in the batch. With
    `slots=None` (the default here) the batch runs in lockstep; fixed-step solves (`steps=N`) cost
    the same for every example and always do.
    """
    sde, eps, x = _check_flow_inputs(model, sde, x, eps)
    estimator = _check_likelihood_options(
        trace, num_probes, key, divergence_mode, control_variate, x
    )
    opts = make_ode_options(solver, rtol, atol, steps, max_steps, time, schedule)
    slots = check_positive_int(slots, "slots", allow_none=True)
    if key is None:
        key = jax.random.key(0)  # unused: the exact trace draws nothing
    keys = jax.random.split(key, x.shape[0])
    if slots is not None and opts.adaptive:
        check_refill_solver(opts.solver, opts.clock)
        logp_probes, z, nfe, num_steps = refill_log_likelihood(
            model, sde, x, keys, eps, opts, estimator, divergence_mode, slots
        )
    else:
        logp_probes, z, nfe, num_steps = _log_likelihood(
            model, sde, x, keys, eps, opts, estimator, divergence_mode
        )
    return LikelihoodResult(
        logp=jnp.mean(logp_probes, axis=1), z=z, nfe=nfe, num_steps=num_steps,
        logp_probes=logp_probes, exact_trace=isinstance(estimator, ExactTrace),
    )


@eqx.filter_jit
def _dequantize(x_int, key, num_bins, lo, hi, dequantize, dtype):
    x_int = x_int.astype(jnp.int32)  # uint8 data with num_bins=256 must not wrap around
    bad = (x_int < 0) | (x_int >= num_bins)
    x_int = eqx.error_if(
        x_int, jnp.any(bad), f"x_int must hold integers in [0, num_bins={num_bins})"
    )
    if dequantize:
        u = jax.random.uniform(key, x_int.shape, dtype)
    else:
        u = jnp.full(x_int.shape, 0.5, dtype)
    return to_model_space(x_int.astype(dtype), u, num_bins, (lo, hi))


#: bits_per_dim's tolerance, chosen on digits-vp and an mnist-5k U-Net (docs/benchmarks.md,
#: "Bits/dim on real networks"): a solver bias far below 1e-3 bits/dim and a test set's standard
#: error, at half the evaluations of rtol = atol = 1e-5, which `log_likelihood` keeps (the
#: contract's shared default) and the paper uses (RK45).
#: bits_per_dim's defaults: diffrax.Dopri5() in sqrt(t) time (VP) at rtol = atol = 3e-4, from the
#: work-precision sweep of benchmarks/likelihood_real.py (docs/benchmarks.md): on the shipped
#: digits U-Net and an MNIST U-Net the fastest setting whose bias stays far below 1e-3 bits/dim.
BPD_TOL = 3e-4
BPD_TIME = "sqrt_t"


def bits_per_dim(
    model: Callable,
    sde: AbstractSDE,
    x_int: ArrayLike,
    *,
    key: PRNGKeyArray | None = None,
    num_bins: int = 256,
    data_range: tuple[float, float] = (0.0, 1.0),
    dequantize: bool = True,
    eps: float = 1e-5,
    dtype=None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = BPD_TOL,
    atol: float = BPD_TOL,
    time: str | AbstractClock | None = None,
    slots: int | str | None = "auto",
    **likelihood_options,
) -> BitsPerDimResult:
    """Bits per dimension of integer data under uniform dequantization.

    y = x_int + u with u ~ U[0, 1)^D (u = 1/2 without dequantization); the model sees
    x = lo + (hi - lo) y / num_bins; then

        bpd = -(log p(x) + D log((hi - lo) / num_bins)) / (D log 2),

    the negative log-likelihood of y / num_bins on [0, 1]^D in bits per dimension, an upper bound on
    the discrete data's code length (Theis et al. 2016). `likelihood_options` go to
    `log_likelihood` (`trace="rademacher"` by default, `num_probes`, solver options). `r.bpd_probes`
    [B, P] holds one value per probe; `pf.summarize_bits_per_dim(r)` (or a list of results with
    fresh `key`s, for repeated dequantization) gives the data set's mean, its standard error, and
    the spread between images and the probe noise separately.

    Defaults: `diffrax.Dopri5()` at rtol = atol = 3e-4 in the clock that suits the SDE
    (`time=None`: "sqrt_t" for `VPSDE`, whose std(t) ~ sqrt(t) near 0, else "t"; "t" for the
    exponential integrators), with `slots="auto"`
    (on CPU 64 slots for examples of up to 512 dimensions, 32 up to 2048, else 16; 1024 on
    accelerators; see `log_likelihood`). On the shipped digits model and an MNIST U-Net the
    solver's bias of the mean is a few 1e-4 bits/dim or less, far below a test set's standard
    error, at less than half the evaluations of Tsit5 at 1e-5 (docs/benchmarks.md). The
    paper's setting is one option away: `solver=diffrax.Dopri5(), rtol=1e-5, atol=1e-5,
    time="t"` (its RK45 is Dormand--Prince 5(4)); `slots=None` solves the batch in lockstep.
    """
    if isinstance(x_int, (list, tuple)):
        x_int = jnp.asarray(x_int)
    if not hasattr(x_int, "dtype") or not jnp.issubdtype(x_int.dtype, jnp.integer):
        got = getattr(x_int, "dtype", type(x_int))
        raise ValueError(
            f"x_int must be an integer array (pixel levels in [0, num_bins)), got {got}; "
            "pass the raw integer data, not values already scaled to the model's range"
        )
    x_int = jnp.asarray(x_int)
    if x_int.ndim < 1 or x_int.shape[0] < 1:
        raise ValueError(f"x_int must have a leading batch axis, got shape {x_int.shape}")
    num_bins = check_positive_int(num_bins, "num_bins")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi), got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be finite with hi > lo, got {data_range!r}")
    if key is None and dequantize:
        raise ValueError("key is required when dequantize=True (it draws the noise u)")
    if key is None:
        key = jax.random.key(0)
    dtype = jnp.result_type(float) if dtype is None else dtype
    k_deq, k_probe = jax.random.split(key)
    x = _dequantize(x_int, k_deq, num_bins, lo, hi, bool(dequantize), dtype)
    if isinstance(slots, str):
        if slots != "auto":
            raise ValueError(f"slots must be a positive integer, None or 'auto', got {slots!r}")
        slots = default_slots(math.prod(x.shape[1:]))
    if solver is None:
        solver = diffrax.Dopri5()
    if time is None:
        # sqrt(t) suits the VP SDE, whose std(t) ~ sqrt(beta_min t) near 0 (the time change makes
        # the field smooth there); sub-VP's std(t) ~ beta_min t and VE's is smooth already, so
        # they stay in t (on digits-subvp sqrt(t) is biased by +2.5e-3 bits/dim, t by +5e-4).
        vp = isinstance(sde, VPSDE) and not isinstance(solver, AbstractExponentialIntegrator)
        time = BPD_TIME if vp else "t"
    r = log_likelihood(model, sde, x, key=k_probe, eps=eps, solver=solver, rtol=rtol, atol=atol,
                       time=time, slots=slots, **likelihood_options)
    d = math.prod(x.shape[1:])
    bpd = -(r.logp + d * math.log((hi - lo) / num_bins)) / (d * math.log(2.0))
    bpd_probes = -(r.logp_probes + d * math.log((hi - lo) / num_bins)) / (d * math.log(2.0))
    return BitsPerDimResult(
        bpd=bpd, logp=r.logp, z=r.z, nfe=r.nfe, num_steps=r.num_steps, bpd_probes=bpd_probes,
        exact_trace=r.exact_trace,
    )
