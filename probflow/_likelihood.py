"""Likelihoods by the probability-flow ODE augmented with the divergence (Song et al. 2021,
appendix D): `log_likelihood` and `bits_per_dim` (dequantization and the bits/dim formula).

Every public function validates in Python, then calls one `eqx.filter_jit`-ed function that
vmaps a single-example solve (`_flow.solve_flow`) over the batch, or hands the batch to the
refill scheduler (`_refill.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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
from ._failures import input_failure, raise_if_failed
from ._flow import _check_flow_inputs, solve_flow
from ._options import make_ode_options
from ._refill import check_refill_solver, default_slots, refill_log_likelihood
from ._results import BitsPerDimResult, LikelihoodResult
from ._sde import VPSDE, AbstractSDE
from ._time import AbstractClock, AbstractStepSchedule
from ._validate import check_model, check_positive_int
from .data._dataset import to_model_space

_DIVERGENCE_MODES = DIVERGENCE_MODES


# --------------------------------------------------------------------------- likelihoods


@eqx.filter_jit
def _log_likelihood(model, sde, x, keys, eps, opts, estimator, divergence_mode):
    check_model(model, x.shape[1:], x.dtype)

    def one(xi, key):
        probes = estimator.draw(key, xi.shape, xi.dtype)
        vf = AugmentedProbabilityFlowODE(model, sde, probes, divergence_mode, estimator)
        # One divergence integral per probe, all from the same linearisations of the model.
        y0 = (xi, jnp.zeros((estimator.num_probes,), xi.dtype))
        (z, delta), nfe, num_steps, failure = solve_flow(vf, y0, eps, sde.T, opts, sde=sde)
        # log p_eps(x) = log p_T(z) + int_eps^T div F dt  (appendix D)
        return sde.prior_logp(z) + delta, z, nfe, num_steps, failure

    logp, z, nfe, num_steps, failure = jax.vmap(one)(x, keys)
    return logp, z, nfe, num_steps, input_failure(x, eps) | failure


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
        logp_probes, z, nfe, num_steps, failure = refill_log_likelihood(
            model, sde, x, keys, eps, opts, estimator, divergence_mode, slots
        )
    else:
        logp_probes, z, nfe, num_steps, failure = _log_likelihood(
            model, sde, x, keys, eps, opts, estimator, divergence_mode
        )
    raise_if_failed(failure, what="ODE solve (likelihood)", direction=1,
                    max_steps=opts.max_steps)
    return LikelihoodResult(
        logp=jnp.mean(logp_probes, axis=1), z=z, nfe=nfe, num_steps=num_steps,
        logp_probes=logp_probes, exact_trace=isinstance(estimator, ExactTrace),
    )


@eqx.filter_jit
def _dequantize(x_int, key, num_bins, lo, hi, dequantize, dtype):
    x_int = x_int.astype(jnp.int32)  # uint8 data with num_bins=256 must not wrap around
    # Per example: whether it holds a level outside [0, num_bins) (raised in Python).
    bad = jnp.any(((x_int < 0) | (x_int >= num_bins)).reshape(x_int.shape[0], -1), axis=1)
    if dequantize:
        u = jax.random.uniform(key, x_int.shape, dtype)
    else:
        u = jnp.full(x_int.shape, 0.5, dtype)
    x = to_model_space(x_int.astype(dtype), u, num_bins, (lo, hi))
    return x, bad


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
    x, bad = _dequantize(x_int, k_deq, num_bins, lo, hi, bool(dequantize), dtype)
    count = int(np.sum(np.asarray(bad)))
    if count:
        raise ValueError(
            f"x_int must hold integers in [0, num_bins={num_bins}): {count} of "
            f"{x_int.shape[0]} examples hold levels outside"
        )
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
