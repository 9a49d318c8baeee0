"""Sample-quality metrics: distances between two sets of points.

The sliced Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) compares two point clouds
through their one-dimensional projections, where the Wasserstein distance between empirical
measures is a distance between sorted samples. The Frechet distance (Heusel et al. 2017, FID
when the features are Inception's) compares Gaussians fitted to two feature sets.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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

    **Arguments:**

    - `x`: a point cloud [N, ...].
    - `y`: another [M, ...] of the same example shape.
    - `key`: the PRNG key of the directions.
    - `num_projections`: the number of directions.
    - `p`: the order of the distance.
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


def frechet_distance(feat_a: ArrayLike, feat_b: ArrayLike) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2}) between two feature sets [N, F].

    The Frechet (2-Wasserstein) distance between the Gaussians with the sets' means and
    covariances, computed in float64 on the host.

    **Arguments:**

    - `feat_a`: features [N, F] of one set.
    - `feat_b`: features [M, F] of the other.
    """
    a = np.asarray(feat_a, np.float64)
    b = np.asarray(feat_b, np.float64)
    for name, f in (("feat_a", a), ("feat_b", b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be features [N, F] with N >= 2, got shape {f.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feat_a and feat_b must have the same number of features, got {a.shape[1]} and "
            f"{b.shape[1]}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = np.atleast_2d(np.cov(a, rowvar=False))
    cb = np.atleast_2d(np.cov(b, rowvar=False))
    # tr (Ca Cb)^{1/2} = sum sqrt(eig(sqrt(Ca) Cb sqrt(Ca))), all eigenvalues real and >= 0.
    w, v = np.linalg.eigh(ca)
    sqrt_ca = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca)
    tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)
