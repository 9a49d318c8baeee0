"""Gaussian mixtures: the analytic oracle every solver and sampler is checked against.

Under a linear SDE with marginal N(scale x_0, std^2 I), a mixture sum_k w_k N(mu_k, Sigma_k) at
time 0 stays a mixture at time t: p_t = sum_k w_k N(scale mu_k, scale^2 Sigma_k + std^2 I). So its
density, score and component posteriors are exact at every t.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._sde import AbstractSDE
from ._validate import check_positive_int, check_sde


def _component_logpdfs(x: Array, means: Array, covs: Array) -> Array:
    """log N(x; means[k], covs[k]) for one example x [D]; returns [K]."""
    chol = jnp.linalg.cholesky(covs)
    diff = x[None, :] - means
    sol = jsp.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
    maha = jnp.sum(sol * sol, axis=-1)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    d = x.shape[-1]
    return -0.5 * (d * math.log(2 * math.pi) + logdet + maha)


class GaussianMixture(eqx.Module):
    """p_0(x) = sum_k w_k N(x; mu_k, Sigma_k) with weights [K], means [K, D], covs [K, D, D]."""

    weights: Array
    means: Array
    covs: Array

    def __init__(self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike):
        w = np.asarray(weights, dtype=np.float64)
        m = np.asarray(means, dtype=np.float64)
        c = np.asarray(covs, dtype=np.float64)
        if w.ndim != 1 or w.size < 1:
            raise ValueError(f"weights must have shape [K] with K >= 1, got {w.shape}")
        k = w.shape[0]
        if m.ndim != 2 or m.shape[0] != k:
            raise ValueError(f"means must have shape [K={k}, D], got {m.shape}")
        d = m.shape[1]
        if c.shape != (k, d, d):
            raise ValueError(f"covs must have shape [K={k}, D={d}, D={d}], got {c.shape}")
        if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
            raise ValueError("weights must be finite, non-negative and not all zero")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(c))):
            raise ValueError("means and covs must be finite")
        if not np.allclose(c, np.swapaxes(c, -1, -2), atol=1e-10):
            raise ValueError("covs must be symmetric")
        if np.any(np.linalg.eigvalsh(c) <= 0):
            raise ValueError("covs must be positive definite")
        dtype = jnp.result_type(float)
        self.weights = jnp.asarray(w / w.sum(), dtype)
        self.means = jnp.asarray(m, dtype)
        self.covs = jnp.asarray(c, dtype)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def marginal_components(self, sde: AbstractSDE | None, t: ArrayLike) -> tuple[Array, Array]:
        """(means, covs) of the components of p_t; p_0 when sde is None."""
        if sde is None:
            return self.means, self.covs
        scale, std = sde.marginal(t)
        eye = jnp.eye(self.dim, dtype=self.covs.dtype)
        return scale * self.means, scale**2 * self.covs + std**2 * eye

    def component_log_joint(self, x: Array, sde: AbstractSDE | None, t: ArrayLike) -> Array:
        """log w_k + log N_k(x) under p_t for one example x [D]; returns [K]."""
        means, covs = self.marginal_components(sde, t)
        return jnp.log(self.weights) + _component_logpdfs(x, means, covs)

    def log_prob(self, x: ArrayLike, sde: AbstractSDE | None = None, t: ArrayLike = 0.0) -> Array:
        """Exact log p_t(x) for a batch x [B, D]; p_0 when sde is None."""
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [B, D={self.dim}], got {x.shape}")
        if sde is not None:
            check_sde(sde)
        x = x.astype(jnp.result_type(x.dtype, self.means.dtype))
        return jax.vmap(
            lambda xi: jax.nn.logsumexp(self.component_log_joint(xi, sde, t))
        )(x)

    def score_model(self, sde: AbstractSDE) -> MixtureScore:
        """The exact score grad_x log p_t(x) under `sde`, as a model(t, x)."""
        return MixtureScore(self, check_sde(sde))

    def classifier(self, sde: AbstractSDE) -> MixtureClassifier:
        """Exact component posteriors log p_t(k | x) under `sde`, as classifier(t, x) -> [K]."""
        return MixtureClassifier(self, check_sde(sde))

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        """n draws [n, D] from p_0."""
        n = check_positive_int(n, "n")
        kc, kz = jax.random.split(key)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(kz, (n, self.dim), self.means.dtype)
        chol = jnp.linalg.cholesky(self.covs)
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol[comp], z)

    def sample_component(self, key: PRNGKeyArray, component: ArrayLike) -> Array:
        """One draw from component `component` (traceable), shape [D]."""
        z = jax.random.normal(key, (self.dim,), self.means.dtype)
        chol = jnp.linalg.cholesky(self.covs[component])
        return self.means[component] + chol @ z

    def condition(self, observed: ArrayLike, values: ArrayLike) -> GaussianMixture:
        """The mixture of the unobserved coordinates given x[observed] = values.

        `observed` is a boolean mask [D]; the result lives on the D - sum(observed) free
        coordinates, in their original order. Each component is conditioned by the Gaussian
        formulas and re-weighted by the marginal likelihood of `values`.
        """
        obs = np.asarray(observed, dtype=bool)
        if obs.shape != (self.dim,):
            raise ValueError(f"observed must be a boolean mask of shape [{self.dim}]")
        if obs.all() or not obs.any():
            raise ValueError("observed must mark some, but not all, coordinates")
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (int(obs.sum()),):
            raise ValueError(f"values must have shape [{int(obs.sum())}], got {v.shape}")
        free = ~obs
        m = np.asarray(self.means, np.float64)
        c = np.asarray(self.covs, np.float64)
        w = np.asarray(self.weights, np.float64)
        new_m, new_c, logw = [], [], []
        for k in range(self.num_components):
            c_oo = c[k][np.ix_(obs, obs)]
            c_fo = c[k][np.ix_(free, obs)]
            c_ff = c[k][np.ix_(free, free)]
            gain = np.linalg.solve(c_oo, c_fo.T).T
            diff = v - m[k][obs]
            new_m.append(m[k][free] + gain @ diff)
            new_c.append(c_ff - gain @ c_fo.T)
            _, logdet = np.linalg.slogdet(2 * np.pi * c_oo)
            logw.append(np.log(w[k]) - 0.5 * (logdet + diff @ np.linalg.solve(c_oo, diff)))
        logw = np.asarray(logw)
        weights = np.exp(logw - logw.max())
        new_c = np.asarray(new_c)
        new_c = 0.5 * (new_c + np.swapaxes(new_c, -1, -2))
        return GaussianMixture(weights, np.asarray(new_m), new_c)


def _check_example(x, dim: int) -> None:
    """One example of the mixture: shape [D] (broadcasting would silently give another answer)."""
    if jnp.shape(x) != (dim,):
        raise ValueError(
            f"x must be one example of shape ({dim},) (no batch axis; vmap for batches), got "
            f"shape {jnp.shape(x)}"
        )


class MixtureScore(eqx.Module):
    """The exact score of a Gaussian mixture diffused by an SDE: model(t, x) for one example."""

    mixture: GaussianMixture
    sde: AbstractSDE

    def __call__(self, t: ArrayLike, x: Array) -> Array:
        _check_example(x, self.mixture.dim)

        def logp(xi):
            return jax.nn.logsumexp(self.mixture.component_log_joint(xi, self.sde, t))

        return jax.grad(logp)(x)


class MixtureClassifier(eqx.Module):
    """Exact log p_t(component | x): classifier(t, x) -> [K] normalised logits."""

    mixture: GaussianMixture
    sde: AbstractSDE

    def __call__(self, t: ArrayLike, x: Array) -> Array:
        _check_example(x, self.mixture.dim)
        joint = self.mixture.component_log_joint(x, self.sde, t)
        return joint - jax.nn.logsumexp(joint)
