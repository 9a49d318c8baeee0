"""Likelihoods by the probability-flow ODE augmented with the divergence (Song et al. 2021,
appendix D): `log_likelihood` and `bits_per_dim` (dequantization and the bits/dim formula).

Every public function validates in Python, then calls one jitted function (`stored_jit`:
`eqx.filter_jit`, kept on disk when a program store is open) that vmaps a single-example solve
(`_flow.solve_flow`) over the batch, or hands the batch to the refill scheduler (`_refill.py`).
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

from ._dequantization import (
    AbstractDequantization,
    UniformDequantization,
    as_dequantization,
    importance_weighted,
)
from ._divergence import (
    DIVERGENCE_MODES,
    AbstractTraceEstimator,
    AugmentedProbabilityFlowODE,
    ExactTrace,
    GaussianControlVariate,
    GaussianTrace,
    make_trace_estimator,
)
from ._elbo import VariationalBound, as_bound, elbo
from ._failures import input_failure, raise_if_failed
from ._flow import _check_flow_inputs, solve_flow
from ._options import ODEOptions, Refill, as_scheduler, ode_options
from ._program_store import stored_jit
from ._refill import refill_solve
from ._results import BitsPerDimResult, LikelihoodResult
from ._sde import AbstractSDE
from ._time import AbstractClock, AbstractStepSchedule
from ._validate import (
    check_eps,
    check_model,
    check_num_bins,
    check_positive_int,
    check_sde,
    example_keys,
    holds_example_keys,
)
from .data._dataset import to_model_space

_DIVERGENCE_MODES = DIVERGENCE_MODES


# --------------------------------------------------------------------------- likelihoods


class _LikelihoodIntegrand(eqx.Module):
    """The likelihood's integrand, written once for both schedulers: the augmented ODE
    (x, delta) of one example with its probes, its start and its log-density (appendix D)."""

    model: Callable
    sde: AbstractSDE
    estimator: AbstractTraceEstimator
    divergence_mode: str = eqx.field(static=True)

    def start(self, x, key):
        """(y0, probes) of one example: the probes are drawn once, fixed for the whole solve."""
        probes = self.estimator.draw(key, x.shape, x.dtype)
        # One divergence integral per probe, all from the same linearisations of the model.
        return (x, jnp.zeros((self.estimator.num_probes,), x.dtype)), probes

    def vector_field(self, probes):
        return AugmentedProbabilityFlowODE(
            self.model, self.sde, probes, self.divergence_mode, self.estimator
        )

    def log_density(self, y1):
        """log p_eps(x) = log p_T(z) + int_eps^T div F dt  (appendix D), one per probe."""
        z, delta = y1
        return self.sde.prior_logp(z) + delta


@stored_jit
def _log_likelihood(model, sde, x, keys, eps, opts, estimator, divergence_mode):
    """Every example's (logp per probe, z, nfe, num_steps), solved in lockstep (a vmapped
    `solve_flow`) or refilled (`refill_solve`) as the plan's scheduler says."""
    check_model(model, x.shape[1:], x.dtype)
    integrand = _LikelihoodIntegrand(model, sde, estimator, divergence_mode)
    y0, probes = jax.vmap(integrand.start)(x, keys)
    if isinstance(opts.scheduler, Refill):
        y1, nfe, num_steps, failure = refill_solve(
            integrand.vector_field, y0, probes, eps, sde.T, opts, sde=sde
        )
    else:
        y1, nfe, num_steps, failure = jax.vmap(
            lambda y, p: solve_flow(integrand.vector_field(p), y, eps, sde.T, opts, sde=sde)
        )(y0, probes)
    logp = jax.vmap(integrand.log_density)(y1)
    return logp, y1[0], nfe, num_steps, input_failure(x, eps) | failure


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
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int | None = None,
    divergence_mode: str = "jvp",
    time: str | AbstractClock | None = None,
    schedule: str | AbstractStepSchedule | None = None,
    slots: int | str | None = None,
    options: ODEOptions | None = None,
) -> LikelihoodResult:
    """log p_eps(x) in nats for a batch, by the ODE augmented with the divergence (appendix D).

    log p_eps(x) = sde.prior_logp(z) + int_eps^T div F(x(t), t) dt with z = x(T). Each probe gets
    its own divergence integral from the same model evaluations: `r.logp_probes` [B, P],
    `r.logp` their mean, and the spread between them estimates the probe noise
    (`pf.summarize_bits_per_dim`). The exponential integrators (`pf.DPMSolver`,
    `pf.DPMSolverMultistep`) integrate the divergence alongside x (see `_dpm.py`).

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `x`: a batch of data [B, ...] in the model's range.
    - `key`: the PRNG key of the Hutchinson probes (not needed for `trace="exact"`): one key,
      split into one per example, or one key per example (shape [B]).
    - `trace`: the divergence: `"rademacher"` (the default, the least noisy), `"gaussian"` (on
      the whole drift's Jacobian, as the paper's code), `"exact"` (one push per dimension), or an
      estimator object (`pf.RademacherTrace(num_probes)`, `pf.GaussianTrace`, `pf.ExactTrace()`).
    - `num_probes`: Hutchinson probes per example, fixed for the whole solve.
    - `control_variate`: a `pf.GaussianControlVariate` for `trace="gaussian"`, which removes most
      of its extra noise.
    - `eps`: the smallest time, where the solve starts (default 1e-5).
    - `divergence_mode`: how the divergence is pushed through the model (`"jvp"`, the default).
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`, `time`, `schedule`: the solve plan's
      settings, as in `pf.ODEOptions` (which owns their defaults); not given (None): the
      default.
    - `slots`: the plan's scheduler: S for `pf.Refill(S)` (S examples at a time, a slot refilled
      as soon as its example finishes, so the batch costs its mean NFE and each example's result
      is that of its own solve), `"auto"` for `pf.Refill()`, None or `"lockstep"` for
      `pf.Lockstep()` (the default here). Fixed-step solves always run in lockstep.
    - `options`: a `pf.ODEOptions` plan instead of the solve keywords and `slots` (both at
      once: ValueError).

    **Returns:** `LikelihoodResult` with `logp` [B], `logp_probes` [B, P], `z`, `nfe`,
    `num_steps`.
    """
    sde, eps, x = _check_flow_inputs(model, sde, x, eps)
    estimator = _check_likelihood_options(
        trace, num_probes, key, divergence_mode, control_variate, x
    )
    opts = ode_options(
        options, solver=solver, rtol=rtol, atol=atol, steps=steps, max_steps=max_steps,
        time=time, schedule=schedule, scheduler=None if slots is None else as_scheduler(slots),
    ).for_examples(math.prod(x.shape[1:]))
    if key is None:
        key = jax.random.key(0)  # unused: the exact trace draws nothing
    keys = example_keys(key, x.shape[0])
    logp_probes, z, nfe, num_steps, failure = _log_likelihood(
        model, sde, x, keys, eps, opts, estimator, divergence_mode
    )
    raise_if_failed(failure, what="ODE solve (likelihood)", direction=1,
                    max_steps=opts.max_steps)
    return LikelihoodResult(
        logp=jnp.mean(logp_probes, axis=1), z=z, nfe=nfe, num_steps=num_steps,
        logp_probes=logp_probes, exact_trace=isinstance(estimator, ExactTrace),
    )


@stored_jit
def _dequantize(x_int, key, num_bins, lo, hi, dequantization, dtype, sde, eps, per_example: bool):
    """Model-space draws y and log q_u(u | x) [B] (see `_dequantization.py`); the cell centres
    and log q_u = 0 when `dequantization` is None (no dequantization). `per_example`: `key`
    holds one key per example, each drawing its own example's noise."""
    x_int = x_int.astype(jnp.int32)  # uint8 data with num_bins=256 must not wrap around
    if dequantization is not None:
        def draw(k, shape):
            return dequantization.sample(
                k, shape, dtype, bin_width=(hi - lo) / num_bins, sde=sde, eps=eps
            )

        if per_example:
            u, log_q = jax.vmap(lambda k: draw(k, (1, *x_int.shape[1:])))(key)
            u, log_q = u[:, 0], log_q[:, 0]
        else:
            u, log_q = draw(key, x_int.shape)
    else:
        u, log_q = jnp.full(x_int.shape, 0.5, dtype), jnp.zeros(x_int.shape[:1], dtype)
    return to_model_space(x_int.astype(dtype), u, num_bins, (lo, hi)), log_q


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
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int | None = None,
    time: str | AbstractClock | None = None,
    schedule: str | AbstractStepSchedule | None = None,
    slots: int | str | None = "auto",
    method: str | VariationalBound = "ode",
    dequantization: AbstractDequantization | None = None,
    importance_samples: int = 1,
    options: ODEOptions | None = None,
    **likelihood_options,
) -> BitsPerDimResult:
    """Bits per dimension of integer data under uniform dequantization.

    y = x_int + u with u ~ U[0, 1)^D (u = 1/2 without dequantization); the model sees
    x = lo + (hi - lo) y / num_bins; then

        bpd = -(log p(x) + D log((hi - lo) / num_bins)) / (D log 2),

    the negative log-likelihood of y / num_bins on [0, 1]^D in bits per dimension, an upper bound on
    the discrete data's code length (Theis et al. 2016). `r.bpd_probes` [B, P] holds one value per
    probe; `pf.summarize_bits_per_dim(r)` (or a list of results with fresh `key`s, for repeated
    dequantization) gives the data set's mean, its standard error, and the spread between images
    and the probe noise separately.

    The solve plan's defaults are `pf.ODEOptions.bits_per_dim(sde)`: `diffrax.Dopri5()` at
    rtol = atol = 3e-4, in sqrt(t) time for `VPSDE` and t otherwise, refilled slots. On the
    shipped digits models the solver's estimated bias of the mean is +0.0016 +- 0.0007 (VP) and
    +0.0006 +- 0.0008 (sub-VP) bits/dim, below a tenth of the standard error of 300 test images,
    at less than half the evaluations of Tsit5 at 1e-5 (docs/likelihood.md,
    `pf.evaluate_bits_per_dim(check_solver=N)` measures it for your model). The paper's setting
    is `options=pf.ODEOptions.paper()`.

    `dequantization`: `pf.UniformDequantization()` (the default, u above) or
    `pf.TruncatedNormalDequantization()` (i-DODE: noise matched to eps, a tighter bound); then
    bpd = -(log p(y) - log q(y | x)) / (D log 2) with q the dequantization's density on model
    space (for uniform, -log q = D log((hi - lo) / num_bins): the formula above).
    `importance_samples=K` draws K dequantizations per image and combines them by log-mean-exp
    of p(y_k) / q(y_k | x) (a bound for every K, tighter as K grows; `r.log_weights` [B, K, P]
    holds every draw, `r.nfe` their total). With Hutchinson probes it is a bound only up to the
    probe noise inside the log-mean-exp (a downward bias of about its variance / 2 nats as K
    grows), so each draw's P probes are averaged first and `r.bpd_probes` is [B, 1] for K > 1;
    use `trace="exact"` or several probes when this number is the one reported.
    `method="elbo"` (or a `pf.VariationalBound(...)`) replaces log p(y) by minus the variational
    bound of `pf.elbo` (no ODE solve; the solver options are then unused and `r.z` is None).
    See docs/likelihood.md.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `x_int`: a batch of integer data [B, ...] in [0, num_bins).
    - `key`: the PRNG key of the dequantization noise and the probes: one key for the batch, or
      one key per example (shape [B]), so that an example's draws depend on its key alone and
      any subset can be solved again with the same draws.
    - `num_bins`: the number of levels of the data (256 for 8-bit images).
    - `data_range`: (lo, hi), the model's data range.
    - `dequantize`: add uniform noise (True) or use u = 1/2 (False).
    - `eps`: the smallest time, where the solve starts (default 1e-5).
    - `dtype`: the dtype of the model's input (default: JAX's default float).
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`, `time`, `schedule`: the solve plan's
      settings, as in `pf.ODEOptions.bits_per_dim(sde)` (which owns their defaults); not given
      (None): the default.
    - `slots`: the scheduler: `"auto"` (the default: `pf.Refill()`), S (`pf.Refill(S)`), None or
      `"lockstep"` (`pf.Lockstep()`); see `log_likelihood`.
    - `options`: a `pf.ODEOptions` plan instead of the solve keywords and `slots` (both at once:
      ValueError).
    - `method`: "ode" (the default) or "elbo" / a `pf.VariationalBound(...)`: the bound of
      `pf.elbo` instead of the ODE's log-likelihood.
    - `dequantization`: `pf.UniformDequantization()` (None: the default) or
      `pf.TruncatedNormalDequantization()`.
    - `importance_samples`: K dequantization draws per image, combined by log-mean-exp.
    - `likelihood_options`: `log_likelihood`'s other options (`trace`, `num_probes`,
      `control_variate`, `divergence_mode`).

    **Returns:** `BitsPerDimResult` with `bpd` [B], `bpd_probes` [B, P], `logp`, `z` (None for
    the ELBO), `nfe`, `num_steps`, `log_weights` [B, K, P].
    """
    if isinstance(x_int, (list, tuple)):
        x_int = jnp.asarray(x_int)
    dtype_in = getattr(x_int, "dtype", None)
    if dtype_in is None or not jnp.issubdtype(dtype_in, jnp.integer):
        got = type(x_int) if dtype_in is None else dtype_in
        raise ValueError(
            f"x_int must be an integer array (pixel levels in [0, num_bins)), got {got}; "
            "pass the raw integer data, not values already scaled to the model's range"
        )
    x_int = jnp.asarray(x_int)
    if x_int.ndim < 1 or x_int.shape[0] < 1:
        raise ValueError(f"x_int must have a leading batch axis, got shape {x_int.shape}")
    num_bins = check_num_bins(num_bins)
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
    sde = check_sde(sde)
    eps = check_eps(eps, sde)
    deq = as_dequantization(dequantization)
    if not dequantize and not isinstance(deq, UniformDequantization):
        raise ValueError("dequantization must be None or uniform when dequantize=False")
    bound = as_bound(method)
    k = int(check_positive_int(importance_samples, "importance_samples") or 1)
    dtype = jnp.result_type(float) if dtype is None else dtype
    b = x_int.shape[0]
    per_example = holds_example_keys(key)
    if per_example:  # draw k of example b: fold_in(split(key[b])[i], k), i = 0 noise, 1 probes
        k_deq, k_probe = _row_keys(example_keys(key, b), k)
    else:
        k_deq, k_probe = jax.random.split(key)
    # Levels outside [0, num_bins), per example, checked here in Python (no host callback in
    # the compiled dequantization).
    levels = np.asarray(x_int).astype(np.int64)  # on the host: no program to compile for it
    outside = int(np.sum(np.any(((levels < 0) | (levels >= num_bins)).reshape(b, -1), axis=1)))
    if outside:
        raise ValueError(
            f"x_int must hold integers in [0, num_bins={num_bins}): {outside} of {b} examples "
            "hold levels outside"
        )
    x_draws = x_int if k == 1 else jnp.concatenate([x_int] * k)  # row k * B + b: draw k of b
    x, log_q = _dequantize(x_draws, k_deq, num_bins, lo, hi, deq if dequantize else None, dtype,
                           sde, eps, per_example)
    if bound is None:
        opts = ode_options(
            options, lambda **given: ODEOptions.bits_per_dim(sde, **given), solver=solver,
            rtol=rtol, atol=atol, steps=steps, max_steps=max_steps, time=time, schedule=schedule,
            scheduler=None if slots == "auto" else as_scheduler(slots),
        )
        r = log_likelihood(model, sde, x, key=k_probe, eps=eps, options=opts,
                           **likelihood_options)
        logp_probes, z, nfe, num_steps, exact = (
            r.logp_probes, r.z[:b], r.nfe, r.num_steps, r.exact_trace
        )
    else:
        e = elbo(model, sde, x, key=k_probe, eps=eps, num_times=bound.num_times,
                 num_reconstruction=bound.num_reconstruction, chunk_size=bound.chunk_size)
        logp_probes, z, nfe, exact = -e.nll[:, None], None, e.nfe, False
        num_steps = jnp.zeros_like(nfe)
    d = math.prod(x.shape[1:])
    log_width = d * math.log((hi - lo) / num_bins)
    bpd, logp, nfe, num_steps, bpd_probes, log_weights = _bits_per_dim_of(
        logp_probes, log_q, nfe, num_steps, k, d, log_width
    )
    return BitsPerDimResult(
        bpd=bpd, logp=logp, z=z, nfe=nfe, num_steps=num_steps, bpd_probes=bpd_probes,
        exact_trace=exact, log_weights=log_weights,
    )


@stored_jit
def _row_keys(keys, k: int):
    """The dequantization and probe keys of the K * B rows (row k * B + b: draw k of example b)
    from one key per example: fold_in(split(keys[b])[i], k), i = 0 for the noise, 1 the probes."""
    pairs = jax.vmap(jax.random.split)(keys)  # [B, 2]

    def rows(i):
        fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
        return jnp.concatenate([fold(pairs[:, i], j) for j in range(k)])

    return rows(0), rows(1)


@stored_jit
def _bits_per_dim_of(logp_probes, log_q, nfe, num_steps, k: int, d: int, log_width: float):
    """The bits/dim formula of `bits_per_dim` on the K draws of B images (rows k * B + b), as
    one compiled program rather than a dozen small ones."""
    b = log_q.shape[0] // k
    # log p(y) - log q(y | x) on model space, q = q_u / w^D; [B, K, P]
    log_weights = logp_probes - log_q[:, None] + log_width
    log_weights = jnp.swapaxes(log_weights.reshape(k, b, -1), 0, 1)
    if k > 1:
        # The probes of a draw are averaged inside the log-mean-exp: probe noise there biases the
        # bound down by about its variance / 2 as K grows, and averaging divides it by P.
        bpd_probes = -importance_weighted(jnp.mean(log_weights, axis=2, keepdims=True))
    else:
        bpd_probes = -log_weights[:, 0]
    bpd_probes = bpd_probes / (d * math.log(2.0))
    bpd = jnp.mean(bpd_probes, axis=1)
    logp = -bpd * (d * math.log(2.0)) - log_width
    return (bpd, logp, nfe.reshape(k, b).sum(0), num_steps.reshape(k, b).sum(0), bpd_probes,
            log_weights)
