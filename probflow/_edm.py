"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): Heun steps of the probability-flow
ODE with "churn", fresh noise that first raises the noise level of each step.

In the variables of the VE form, x~ = x / alpha and sigma = std / alpha = exp(-lambda), every
linear SDE's probability-flow ODE is dx~/dsigma = eps(x, t) with eps = -std score (Karras et al.
2022, eq. 4 with s = 1), and the forward process adds Gaussian noise of variance sigma^2. Step i
from sigma_i to sigma_{i+1} (Algorithm 2, lines 4-10):

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0
    sigma^ = sigma_i (1 + gamma_i);  x~^ = x~_i + sqrt(sigma^2 - sigma_i^2) S_noise z,  z ~ N(0, I)
    d = eps(x~^, sigma^);  x~_{i+1} = x~^ + (sigma_{i+1} - sigma^) d                      (Euler)
    d' = eps(x~_{i+1}, sigma_{i+1});  x~_{i+1} = x~^ + (sigma_{i+1} - sigma^) (d + d') / 2   (Heun)

the Heun correction being skipped on the last step (in the paper that step ends at sigma = 0),
so N steps cost 2N - 1 evaluations. S_tmin and S_tmax bound sigma = std / scale, as in the paper.
sigma^ is capped at sigma(T), where the SDE ends (the paper's networks accept any sigma).

Reference: T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._failures import (
    NONFINITE,
    OK,
    Failure,
    FixedSteps,
    all_finite,
    code_of_result,
    raise_if_failed,
)
from ._multistep import step_schedule
from ._pc import ScoreVectorField
from ._results import SampleResult
from ._sde import AbstractSDE
from ._time import AbstractStepSchedule, EDMSchedule
from ._validate import check_eps, check_model, check_positive_int, check_sde, check_shape


def _check_number(value, name: str, *, positive: bool = False, allow_inf: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (math.isfinite(value) or (allow_inf and value == math.inf))
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        what = "a positive number" if positive else "a number >= 0"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


class EDMStochasticSampler(diffrax.AbstractSolver):
    """Karras et al. 2022, Algorithm 2, as a diffrax solver of the score term, bound to its SDE.

    Used by `pf.sample_edm` (not by `sample_sde`/`decode`); each diffrax step is one Heun step
    (two evaluations) with churn, its noise drawn from the example's key (`args`) folded with
    the step counter.

    **Arguments:**

    - `S_churn`: the total churn (>= 0); step i of N raises sigma by the factor
      1 + min(S_churn / N, sqrt(2) - 1). 0, the default, is the deterministic Heun sampler of
      Algorithm 1.
    - `S_tmin`, `S_tmax`: churn only where S_tmin <= sigma <= S_tmax, sigma = std / scale
      (defaults 0 and inf).
    - `S_noise`: the churn noise's standard deviation (default 1; the paper uses slightly more
      than 1 to offset the denoiser's loss of detail).
    - `sde`, `num_steps`: set by `sample_edm` (`bind`); leave them out.
    """

    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0
    sde: AbstractSDE | None = None
    num_steps: int | None = None

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def __check_init__(self):
        _check_number(self.S_churn, "S_churn")
        _check_number(self.S_tmin, "S_tmin")
        _check_number(self.S_tmax, "S_tmax", positive=True, allow_inf=True)
        _check_number(self.S_noise, "S_noise", positive=True)
        if self.S_tmin > self.S_tmax:
            raise ValueError(f"S_tmin must be <= S_tmax, got {self.S_tmin!r} > {self.S_tmax!r}")

    def bind(self, sde: AbstractSDE, num_steps: int):
        """This sampler for `sde`, in a solve of `num_steps` steps (gamma = S_churn / N)."""
        return EDMStochasticSampler(
            self.S_churn, self.S_tmin, self.S_tmax, self.S_noise, sde=sde, num_steps=num_steps
        )

    def order(self, terms):
        return None

    def strong_order(self, terms):
        return None

    def churn_step(self, score: Callable, t, t_next, x, key: PRNGKeyArray, *, heun: bool):
        """One step of Algorithm 2 from time t to t_next (real times): churn, then Euler, then
        (with `heun`) the trapezoidal correction. `score(t, x)` is the model."""
        sde = self.sde
        if sde is None or self.num_steps is None:
            raise ValueError(
                "EDMStochasticSampler must be bound to an SDE: pass it as solver= to "
                "pf.sample_edm, or call sampler.bind(sde, num_steps) first"
            )
        dtype = x.dtype
        a0, s0 = sde.marginal(t)
        a1, s1 = sde.marginal(t_next)
        sig0, sig1 = s0 / a0, s1 / a1
        a_T, s_T = sde.marginal(sde.T)
        sig_max = s_T / a_T
        in_range = (sig0 >= self.S_tmin) & (sig0 <= self.S_tmax)
        gamma = jnp.where(
            in_range, min(self.S_churn / self.num_steps, math.sqrt(2.0) - 1.0), 0.0
        )
        sig_hat = jnp.minimum(sig0 * (1.0 + gamma), jnp.maximum(sig_max, sig0))
        churned = sig_hat > sig0
        t_hat = jnp.where(
            churned, sde.time_of_log_snr(-jnp.log(jnp.where(churned, sig_hat, sig0))), t
        )
        noise = jax.random.normal(key, x.shape, dtype)
        xt_hat = x / a0 + jnp.sqrt(jnp.maximum(sig_hat**2 - sig0**2, 0.0)) * self.S_noise * noise

        def eps_at(time, xt):
            a, s = sde.marginal(time)
            return -s * score(time, (a * xt).astype(dtype))

        d = eps_at(t_hat, xt_hat)
        xt1 = xt_hat + (sig1 - sig_hat) * d
        if heun:
            d2 = eps_at(t_next, xt1)
            xt1 = xt_hat + (sig1 - sig_hat) * 0.5 * (d + d2)
        return (a1 * xt1).astype(dtype)

    def init(self, terms, t0, t1, y0, args):
        return jnp.zeros((), jnp.int32)  # the step counter

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        direction = jnp.sign(terms.contr(t0, t1))  # diffrax integrates in +time
        t, t_next = direction * t0, direction * t1

        def score(time, x):
            return terms.vf(direction * time, x, args).astype(x.dtype)

        key = jax.random.fold_in(args, solver_state)
        x1 = self.churn_step(score, t, t_next, y0, key, heun=True)
        return x1, None, dict(y0=y0, y1=x1), solver_state + 1, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def solve_edm(model: Callable, sampler: EDMStochasticSampler, x_T, ts, key: PRNGKeyArray):
    """Algorithm 2 for one example from x_T on the times `ts` (T down to eps, N + 1 of them):
    N - 1 Heun steps with churn in diffrax, then the last step without Heun's correction.
    Returns (x, nfe, num_steps, failure): sampling stops at the first non-finite state
    (`_failures.FixedSteps`), and a non-finite last step is reported at its start."""
    steps = ts.shape[0] - 1
    x = x_T
    heun_steps = jnp.zeros((), jnp.int32)
    failure = Failure(jnp.asarray(OK, jnp.int32), ts[-1])
    if steps > 1:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(ScoreVectorField(model)),
            sampler,
            t0=ts[0],
            t1=ts[-2],
            dt0=None,
            y0=x_T,
            args=key,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=FixedSteps(ts[:-1]),
            max_steps=steps - 1,
            throw=False,
        )
        x = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
        heun_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        t_end = sol.ts[-1]  # pyright: ignore[reportOptionalSubscript]
        failure = Failure(code_of_result(sol.result), t_end)
    x = sampler.churn_step(
        model, ts[-2], ts[-1], x, jax.random.fold_in(key, steps - 1), heun=False
    )
    last = Failure(jnp.where(all_finite(x), OK, NONFINITE).astype(jnp.int32), ts[-2])
    return x, 2 * heun_steps + 1, heun_steps + 1, failure | last


@eqx.filter_jit
def _sample_edm(model, sde, keys, shape, dtype, eps, steps, sampler, schedule):
    check_model(model, shape, dtype)  # once per trace
    bound = sampler.bind(sde, steps)

    def one(key):
        k_prior, k_chain = jax.random.split(key)
        x_T = sde.prior_sample(k_prior, shape, dtype)
        ts = schedule.times(sde, float(sde.T), eps, steps, dtype)
        return solve_edm(model, bound, x_T, ts, k_chain)

    return jax.vmap(one)(keys)


def sample_edm(
    model: Callable,
    sde: AbstractSDE,
    num_samples: int,
    shape: tuple[int, ...],
    *,
    key: PRNGKeyArray,
    sampler: EDMStochasticSampler = EDMStochasticSampler(),
    steps: int = 18,
    schedule: str | AbstractStepSchedule = EDMSchedule(),
    eps: float = 1e-3,
    dtype=None,
) -> SampleResult:
    """`num_samples` samples by EDM's stochastic sampler (Karras et al. 2022, Algorithm 2):
    prior draws taken from T down to eps by Heun steps with churn.

    `r.nfe` per example is 2 steps - 1: Heun's correction is skipped on the last step.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score`.
    - `sde`: the SDE the model was trained for.
    - `num_samples`, `shape`: how many samples, and each one's shape.
    - `key`: a JAX PRNG key (keyword-only); each sample gets its own prior draw and noise.
    - `sampler`: a `pf.EDMStochasticSampler(S_churn=..., S_tmin=..., S_tmax=..., S_noise=...)`;
      the default has no churn (Algorithm 1).
    - `steps`: the number of steps N (default 18, as EDM's CIFAR-10 sampler).
    - `schedule`: the step times, an `AbstractStepSchedule` or a schedule name (default
      `pf.EDMSchedule()`, EDM's rho = 7).
    - `eps`: the final time (default 1e-3).
    - `dtype`: the samples' dtype (default: JAX's default float).
    """
    sde = check_sde(sde)
    eps = check_eps(eps, sde)
    steps = int(check_positive_int(steps, "steps"))  # type: ignore[arg-type]
    num_samples = int(check_positive_int(num_samples, "num_samples"))  # type: ignore[arg-type]
    shape = check_shape(shape)
    if not isinstance(sampler, EDMStochasticSampler):
        raise ValueError(
            f"sampler must be a pf.EDMStochasticSampler(...), got {type(sampler).__name__}"
        )
    times = step_schedule(schedule)
    dtype = jnp.result_type(float) if dtype is None else dtype
    keys = jax.random.split(key, num_samples)
    x, nfe, num_steps, failure = _sample_edm(model, sde, keys, shape, dtype, eps, steps, sampler,
                                             times)
    raise_if_failed(failure, what="EDM sampling", direction=-1)
    return SampleResult(x=x, nfe=nfe, num_steps=num_steps)
