"""Sample-quality metrics for low-dimensional checks of the samplers.

The sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) compares two point clouds
through their one-dimensional projections, where the Wasserstein distance between empirical
measures is a distance between sorted samples.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._validate import check_positive_float, check_positive_int


def _as_points(x, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(
            f"{name} must be a batch of points [N, ...] with N >= 1, got shape {x.shape}"
        )
    return x.reshape(x.shape[0], -1)


@eqx.filter_jit
def _sliced_wasserstein(x, y, key, num_projections, p):
    d = x.shape[1]
    dirs = jax.random.normal(key, (num_projections, d), x.dtype)
    dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    px = jnp.sort(x @ dirs.T, axis=0)  # [N, L]
    py = jnp.sort(y @ dirs.T, axis=0)  # [M, L]
    # Compare the empirical quantile functions on a common grid of K = max(N, M) levels
    # u_k = (k + 1/2) / K; for N == M this is exactly W_p between the empirical measures.
    k = max(px.shape[0], py.shape[0])
    u = (jnp.arange(k, dtype=x.dtype) + 0.5) / k
    qx = px[jnp.floor(u * px.shape[0]).astype(jnp.int32)]
    qy = py[jnp.floor(u * py.shape[0]).astype(jnp.int32)]
    wp = jnp.mean(jnp.abs(qx - qy) ** p, axis=0)  # W_p^p per projection
    return jnp.mean(wp) ** (1.0 / p)


def sliced_wasserstein(
    x: ArrayLike,
    y: ArrayLike,
    *,
    key: PRNGKeyArray,
    num_projections: int = 512,
    p: float = 2.0,
) -> Array:
    """The sliced p-Wasserstein distance between two point clouds `x` [N, ...] and `y` [M, ...].

    SW_p(x, y) = (E_theta W_p^p(theta . x, theta . y))^(1/p), the expectation over directions
    theta uniform on the unit sphere estimated with `num_projections` directions drawn from `key`
    (the same directions for both clouds). Each one-dimensional W_p compares sorted projections
    (quantile functions on max(N, M) levels; exact for N == M).
    """
    x = _as_points(x, "x")
    y = _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must hold points of the same dimension, got {x.shape[1]} and {y.shape[1]}"
        )
    num_projections = check_positive_int(num_projections, "num_projections")
    p = check_positive_float(p, "p")
    if p < 1:
        raise ValueError(f"p must be >= 1 for a distance, got {p}")
    dtype = jnp.result_type(x.dtype, y.dtype)
    return _sliced_wasserstein(x.astype(dtype), y.astype(dtype), key, num_projections, p)
