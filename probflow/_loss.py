"""Continuous-time denoising score matching (Song et al. 2021, eq. 7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Scalar

from ._sde import AbstractSDE
from .models._base import AbstractScoreModel

_WEIGHTINGS = ("default", "likelihood")


def sample_time(
    sde: AbstractSDE,
    num: int,
    *,
    key: PRNGKeyArray,
    eps: float = 1e-5,
    importance_sampling: bool = False,
) -> Array:
    """`num` times in [eps, T]: uniform, or with density q(t) proportional to g(t)^2 / std(t)^2.

    For every linear SDE, g^2 = d[std^2]/dt - 2 f std^2 and scale = exp(int_0^t f), so
    g^2 / std^2 = -2 d/dt log(scale / std): q is uniform in the log-SNR, and t is its inverse.
    """
    u = jax.random.uniform(key, (num,), minval=0.0, maxval=1.0)
    if not importance_sampling:
        return eps + u * (sde.T - eps)
    lam_hi = sde.log_snr(eps)
    lam_lo = sde.log_snr(sde.T)
    t = sde.time_of_log_snr(lam_hi + u * (lam_lo - lam_hi))
    return jnp.clip(t, eps, sde.T)


def dsm_loss(
    model,
    sde: AbstractSDE,
    x: ArrayLike,
    *,
    key: PRNGKeyArray,
    weighting: str = "default",
    eps: float = 1e-5,
    importance_sampling: bool = False,
) -> Scalar:
    """The denoising score-matching loss (eq. 7) of `model` on a batch `x`, a scalar.

    E_t lambda(t) E ||s(x_t, t) - grad log p_0t(x_t | x_0)||^2 with t ~ U[eps, T], x_t =
    scale x_0 + std z and grad log p_0t = -z / std; the squared norm is summed over the
    dimensions of one example and averaged over the batch. `weighting`: "default" uses
    lambda = std^2, "likelihood" lambda = g^2 (Song et al. 2021b, whose loss bounds the negative
    log-likelihood). `importance_sampling` (likelihood weighting only) draws t with density
    proportional to g^2 / std^2 and reweights, which leaves the expectation unchanged.

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `x`: a batch of data [B, ...] in model space.
    - `key`: the PRNG key of the times and the noise.
    - `weighting`: "default" (lambda = std^2) or "likelihood" (lambda = g^2).
    - `eps`: the smallest time drawn.
    - `importance_sampling`: draw t with density proportional to g^2 / std^2 (likelihood weighting
      only).
    """
    x = jnp.asarray(x)
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be 'default' or 'likelihood', got {weighting!r}")
    if importance_sampling and weighting != "likelihood":
        raise ValueError("importance_sampling=True needs weighting='likelihood'")
    if not (0.0 < float(eps) < sde.T):
        raise ValueError(f"eps must be in (0, T={sde.T}), got {eps!r}")
    if x.ndim < 2:
        raise ValueError(f"x must be a batch [B, ...] of examples, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array (model space), got dtype {x.dtype}")
    batch = x.shape[0]
    k_t, k_z, k_model = jax.random.split(key, 3)
    t = sample_time(sde, batch, key=k_t, eps=eps, importance_sampling=importance_sampling)
    t = t.astype(x.dtype)
    z = jax.random.normal(k_z, x.shape, x.dtype)
    scale, std = jax.vmap(sde.marginal)(t)
    bshape = (batch,) + (1,) * (x.ndim - 1)
    x_t = scale.reshape(bshape) * x + std.reshape(bshape) * z
    if isinstance(model, AbstractScoreModel):
        model_keys = jax.random.split(k_model, batch)
        score = jax.vmap(lambda ti, xi, ki: model(ti, xi, key=ki))(t, x_t, model_keys)
    else:
        score = jax.vmap(model)(t, x_t)
    # ||s - grad log p_0t||^2 std^2 = ||std s + z||^2, computed in this form for accuracy.
    err = jnp.sum((std.reshape(bshape) * score + z) ** 2, axis=tuple(range(1, x.ndim)))
    if weighting == "default":
        per_example = err  # lambda = std^2
    elif not importance_sampling:
        g = jax.vmap(sde.diffusion)(t)
        per_example = (g / std) ** 2 * err  # lambda = g^2
    else:
        # E_U[g^2 L] = E_q[g^2 L / ((T - eps) q)], q = (g^2 / std^2) / Z, Z = 2 (lam(eps) - lam(T))
        z_norm = 2.0 * (sde.log_snr(eps) - sde.log_snr(sde.T))
        per_example = (z_norm / (sde.T - eps)) * err
    return jnp.mean(per_example)


