"""The continuous-time variational bound on -log p(x) (Song, Durkan, Murray, Ermon 2021, Theorem 2
in its denoising-score-matching form, with the offset for the start time eps of their code).

For the model "reverse SDE from the prior to eps, then the Gaussian denoiser
p(x | x_eps) = N((x_eps + std^2 s(x_eps, eps)) / scale, (std / scale)^2 I)", with
x_t = scale(t) x + std(t) z under the forward SDE,

    -log p(x) <= E[-log pi(x_T)]                                                        (prior)
        + 1/2 int_eps^T E[g^2 (||s(x_t, t) + z / std||^2 - ||z / std||^2) - 2 div f] dt  (diffusion)
        + E[-log p(x | x_eps)] - H[q(x_eps | x)]                                  (reconstruction)

and with the exact score of p_t and pi = p_T it is -log p(x) up to the reconstruction's O(eps)
(the path measures agree). The terms are estimated as follows:

- prior: in closed form (a Gaussian cross-entropy);
- diffusion: t is importance-sampled with density g(t)^2 / std(t)^2 on [eps, T] (as the released
  code does). Since g^2 = d(std^2)/dt - 2 f std^2, that density is uniform in the log
  signal-to-noise ratio lambda(t) = log(scale / std), with normaliser
  Z = int_eps^T g^2 / std^2 dt = 2 (lambda(eps) - lambda(T)), so t = lambda^-1(.) needs no
  bisection. The integrand divided by the density is
  Z (||std s + z||^2 - ||z||^2 - 2 D f std^2 / g^2) / 2, as in the released code. (Replacing
  ||z||^2 by its mean D is also unbiased: on the shipped digits U-Net it is 5 % less noisy, on
  smooth densities far noisier, since there std s is small at small t.) u in [0, 1) is
  stratified: N / 2 strata, two independent draws in each, which gives an unbiased variance
  estimate;
- reconstruction: -D log scale(eps) + (||z + std s(x_eps, eps)||^2 - D) / 2 per draw (the entropy
  of q(x_eps | x) in closed form, as the released code).

Every (example, draw) pair is one score evaluation; the pairs are evaluated `chunk_size` at a time
(one vmapped model call each), so memory does not grow with the number of examples or draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PRNGKeyArray

from ._failures import input_failure, raise_if_failed
from ._flow import _check_flow_inputs
from ._results import ELBOResult
from ._sde import AbstractSDE
from ._validate import check_model, check_positive_int, example_keys

#: Score evaluations per vmapped model call: about 2^18 input values (4096 8x8 images, 85 CIFAR
#: images); the U-Nets' activations are a few hundred times larger.
_CHUNK_VALUES = 2**18


class VariationalBound(eqx.Module):
    """How `elbo` estimates the bound: `num_times` diffusion draws (even; t importance-sampled,
    two per stratum), `num_reconstruction` draws at eps, `chunk_size` evaluations per model call
    (None: about 2^18 input values per call)."""

    num_times: int = 256
    num_reconstruction: int = 16
    chunk_size: int | None = None

    def __check_init__(self):
        check_positive_int(self.num_times, "num_times")
        if self.num_times < 2 or self.num_times % 2:
            raise ValueError(f"num_times must be an even integer >= 2, got {self.num_times!r}")
        check_positive_int(self.num_reconstruction, "num_reconstruction")
        if self.num_reconstruction < 2:
            raise ValueError(
                f"num_reconstruction must be >= 2 (its variance is estimated), got "
                f"{self.num_reconstruction!r}"
            )
        check_positive_int(self.chunk_size, "chunk_size", allow_none=True)

    @property
    def nfe(self) -> int:
        """Score evaluations per example."""
        return self.num_times + self.num_reconstruction


def as_bound(method) -> VariationalBound | None:
    """`bits_per_dim`'s `method` as an object: None for the ODE likelihood, else the bound."""
    if isinstance(method, VariationalBound):
        return method
    if method == "ode":
        return None
    if method == "elbo":
        return VariationalBound()
    raise ValueError(f"method must be 'ode', 'elbo' or a pf.VariationalBound, got {method!r}")


def _pair_values(model, sde, x, keys, bound, eps, idx):
    """The estimator's value for (example, draw) pairs `idx` (flat indices b * M + j)."""
    n, m = bound.num_times, bound.nfe
    strata = n // 2
    d = math.prod(x.shape[1:])
    dtype = x.dtype
    b = jnp.minimum(idx // m, x.shape[0] - 1)  # padding pairs reuse the last example
    j = idx % m
    lam_eps = sde.log_snr(jnp.asarray(eps, dtype))
    lam_t = sde.log_snr(jnp.asarray(sde.T, dtype))

    def one(bi, ji):
        key = jax.random.fold_in(keys[bi], ji)
        ku, kz = jax.random.split(key)
        x0 = x[bi]
        z = jax.random.normal(kz, x0.shape, dtype)
        u = ((ji // 2).astype(dtype) + jax.random.uniform(ku, (), dtype)) / strata
        lam = lam_eps - u * (lam_eps - lam_t)
        t_diff = jnp.clip(sde.time_of_log_snr(lam), eps, sde.T)
        diffusion = ji < n
        t = jnp.where(diffusion, t_diff, jnp.asarray(eps, dtype)).astype(dtype)
        scale, std = sde.marginal(t)
        s = model(t, scale * x0 + std * z)
        r2 = jnp.sum(jnp.square(std * s + z))
        g2 = jnp.square(sde.diffusion(t))
        # Diffusion term over the importance density: Z (||std s + z||^2 - ||z||^2
        # - 2 D f std^2 / g^2) / 2 (score_flow's DSM form).
        z_norm = lam_eps - lam_t  # Z / 2
        z2 = jnp.sum(jnp.square(z))
        v_diff = z_norm * (r2 - z2 - 2.0 * d * sde.drift_coef(t) * std * std / g2)
        # Reconstruction: -log N(x; (x_eps + std^2 s) / scale, (std / scale)^2 I) - H[q(x_eps | x)]
        v_rec = -d * jnp.log(scale) + 0.5 * (r2 - d)
        return jnp.where(diffusion, v_diff, v_rec)

    return jax.vmap(one)(b, j)


@eqx.filter_jit
def _elbo(model, sde, x, keys, bound, eps):
    check_model(model, x.shape[1:], x.dtype)
    num, m = x.shape[0], bound.nfe
    d = math.prod(x.shape[1:])
    chunk = bound.chunk_size or max(1, _CHUNK_VALUES // d)
    chunk = min(chunk, num * m)
    pairs = num * m
    num_chunks = -(-pairs // chunk)
    idx = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)
    values = jax.lax.map(lambda i: _pair_values(model, sde, x, keys, bound, eps, i), idx)
    values = values.reshape(-1)[:pairs].reshape(num, m)
    n = bound.num_times
    v_diff, v_rec = values[:, :n], values[:, n:]
    # Two draws per stratum: Var(mean) = sum_s (a_s - b_s)^2 / (4 S^2), unbiased.
    pairs_ab = v_diff.reshape(num, n // 2, 2)
    var_diff = jnp.sum(jnp.square(pairs_ab[..., 0] - pairs_ab[..., 1]), 1) / (n * n)
    var_rec = jnp.var(v_rec, axis=1, ddof=1) / v_rec.shape[1]
    # Prior: E[-log pi(x_T)] with x_T ~ N(scale x, std^2 I) and pi = N(0, sigma^2 I).
    scale_t, std_t = sde.marginal(jnp.asarray(sde.T, x.dtype))
    sig2 = sde.prior_std() ** 2
    sq = jnp.sum(jnp.square(x).reshape(num, -1), axis=1)
    prior = 0.5 * d * math.log(2 * math.pi * sig2) + (scale_t**2 * sq + d * std_t**2) / (2 * sig2)
    diffusion = jnp.mean(v_diff, axis=1)
    reconstruction = jnp.mean(v_rec, axis=1)
    # Non-finite data come back as a code, raised in Python (`_failures`).
    return prior, diffusion, reconstruction, jnp.sqrt(var_diff + var_rec), input_failure(x, eps)


def elbo(
    model: Callable,
    sde: AbstractSDE,
    x: ArrayLike,
    *,
    key: PRNGKeyArray,
    num_times: int = 256,
    num_reconstruction: int = 16,
    eps: float = 1e-5,
    chunk_size: int | None = None,
) -> ELBOResult:
    """An upper bound on -log p(x) in nats for each example of a batch of continuous data, with its
    Monte Carlo standard error (Song, Durkan, Murray, Ermon 2021, Theorem 2, DSM form).

    The bound is for the model "reverse SDE with `model` as its score from the prior to eps, then
    the Gaussian denoiser at eps" (see `_elbo.py`); it needs no ODE solve and no Jacobian, one score
    evaluation per draw: `num_times` draws of t in [eps, T] (even; importance-sampled with density
    g(t)^2 / std(t)^2) and `num_reconstruction` draws at eps, so `r.nfe` = num_times +
    num_reconstruction per example. The draws are evaluated `chunk_size` at a time (default about
    2^18 input values per call). `r.nll` = `r.prior` + `r.diffusion` + `r.reconstruction`;
    `r.stderr` is the standard error of `r.nll` over the draws (the prior term is exact).

    **Arguments:**

    - `model`: the score model `model(t, x)` for one example.
    - `sde`: the forward SDE (`pf.VPSDE`, `pf.SubVPSDE`, `pf.VESDE`).
    - `x`: a batch `[B, ...]` of continuous data in model space.
    - `key`: a PRNG key (keyword-only), split into one per example, or one key per example
      (shape [B]); each example gets its own draws.
    - `num_times`: draws of t in `[eps, T]` per example, even (two per stratum of the importance
      density g(t)^2 / std(t)^2, uniform in the log signal-to-noise ratio); default 256.
    - `num_reconstruction`: draws of the reconstruction term at `eps`, >= 2; default 16.
    - `eps`: the start time of the diffusion term; default 1e-5.
    - `chunk_size`: score evaluations per vmapped model call (memory bound); default about 2^18
      input values per call.

    **Returns:** `ELBOResult`: `nll` [B] (nats), `stderr` [B], `nfe` [B] (= `num_times +
    num_reconstruction`), and the terms `prior`, `diffusion`, `reconstruction` [B].
    """
    sde, eps, x = _check_flow_inputs(model, sde, x, eps)
    bound = VariationalBound(num_times, num_reconstruction, chunk_size)
    if key is None:
        raise ValueError("key is required (it draws the times and the noise)")
    keys = example_keys(key, x.shape[0])
    prior, diffusion, reconstruction, stderr, failure = _elbo(model, sde, x, keys, bound, eps)
    raise_if_failed(failure, what="ELBO", direction=1)
    return ELBOResult(
        nll=prior + diffusion + reconstruction, stderr=stderr,
        nfe=jnp.full(x.shape[:1], bound.nfe, jnp.int32), prior=prior, diffusion=diffusion,
        reconstruction=reconstruction,
    )
