"""Dequantization objects and importance-weighted bounds against the exact discrete likelihood.

For a mixture with diagonal covariances, p_eps = sum_k w_k N(scale mu_k, scale^2 var_k + std^2)
(per dimension) and the probability of a cell is a product of normal CDF differences, so the
exact discrete negative log-likelihood of every quantised example is known (scipy, float64). The
ODE with the exact score and the exact trace gives log p_eps(y) up to the solver's tolerance and
the prior mismatch (both far below the tolerances used here). Every dequantization and K must be
at or above the truth (within Monte Carlo error); the importance-weighted bound must approach it
as K grows; and on data that is discrete at the model's resolution, the truncated-normal
dequantization (matched to the noise at eps) is nearly exact where uniform is far off.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr, logsumexp

import probflow as pf

SDE = pf.VPSDE()
OPTS = dict(trace="exact", rtol=1e-6, atol=1e-6)


def _log_cell(a, b):
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails."""
    flip = a > 0
    a, b = np.where(flip, -b, a), np.where(flip, -a, b)
    lb, la = log_ndtr(b), log_ndtr(a)
    return lb + np.log1p(-np.exp(la - lb))


def _exact_bpd(weights, means, variances, x_int, eps, bins, lo, hi):
    """-log2 P(cell of x_int) / D under p_eps, per example [N]."""
    scale, std = (float(v) for v in SDE.marginal(eps))
    m = scale * np.asarray(means, np.float64)  # [K, D]
    s = np.sqrt(scale**2 * np.asarray(variances, np.float64) + std**2)
    w = (hi - lo) / bins
    a = lo + w * np.asarray(x_int, np.float64)  # [N, D]
    cells = _log_cell((a[:, None] - m) / s, (a[:, None] + w - m) / s).sum(-1)  # [N, K]
    logp = logsumexp(np.log(np.asarray(weights))[None] + cells, axis=1)
    return -logp / (x_int.shape[1] * math.log(2))


def _mixture(weights, means, variances):
    return pf.GaussianMixture(weights, means, [np.diag(v) for v in variances])


def _bound(log_weights, k):
    """The K-draw importance-weighted bound in bits/dim per example, averaged over the disjoint
    groups of K draws in `log_weights` [N, M, 1] (its expectation estimate)."""
    lw = np.asarray(log_weights, np.float64)[..., 0]
    n, m = lw.shape
    groups = lw[:, : m // k * k].reshape(n, m // k, k)
    d = 2
    return -(logsumexp(groups, axis=2) - math.log(k)).mean(1) / (d * math.log(2))


def test_smooth_mixture_every_bound_is_above_and_iw_converges():
    bins, lo, hi, eps = 8, -3.0, 3.0, 1e-5
    weights, means, variances = [0.4, 0.6], [[-1.0, 0.8], [1.0, -0.5]], [[0.2, 0.3], [0.3, 0.25]]
    gm = _mixture(weights, means, variances)
    x = gm.sample(jax.random.key(0), 12)
    x_int = jnp.clip(jnp.floor((x - lo) / (hi - lo) * bins), 0, bins - 1).astype(jnp.int32)
    truth = _exact_bpd(weights, means, variances, np.asarray(x_int), eps, bins, lo, hi)
    model = gm.score_model(SDE)
    common = dict(num_bins=bins, data_range=(lo, hi), eps=eps, **OPTS)
    r = pf.bits_per_dim(model, SDE, x_int, key=jax.random.key(1), importance_samples=32, **common)
    assert r.log_weights.shape == (12, 32, 1) and r.bpd.shape == (12,)
    # bpd is the 32-draw bound itself.
    np.testing.assert_allclose(np.asarray(r.bpd), _bound(r.log_weights, 32), rtol=1e-5)
    gaps = {k: _bound(r.log_weights, k) - truth for k in (1, 4, 32)}
    # Per example the K = 1 values have a spread; their mean over 12 x 32 draws has error se1.
    lw1 = -np.asarray(r.log_weights, np.float64)[..., 0] / (2 * math.log(2))
    se1 = lw1.std() / math.sqrt(lw1.size)
    assert gaps[1].mean() > 0.02 and gaps[1].mean() > 3 * se1, (gaps[1].mean(), se1)
    assert gaps[1].mean() > gaps[4].mean() > gaps[32].mean() > -3 * se1
    se32 = gaps[32].std() / math.sqrt(12)
    assert gaps[32].mean() > -3 * se32 and gaps[32].mean() < 0.5 * gaps[1].mean(), gaps
    # The truncated-normal dequantization is a bound too (a loose one on a smooth density).
    tn = pf.bits_per_dim(model, SDE, x_int, key=jax.random.key(2),
                         dequantization=pf.TruncatedNormalDequantization(), **common)
    assert np.all(np.asarray(tn.bpd) > truth)


def test_discrete_data_truncated_normal_is_tight():
    """Means at cell centres with a variance far below std(eps)^2: p_eps is a bump of width
    std(eps) in each occupied cell, which is what the truncated normal matches."""
    bins, lo, hi, eps = 6, -1.5, 1.5, 1e-3
    w = (hi - lo) / bins
    centres = lo + w * (np.array([[1, 4], [3, 2], [4, 4]]) + 0.5)
    weights, variances = [0.3, 0.3, 0.4], np.full((3, 2), 1e-6)
    gm = _mixture(weights, centres, variances)
    x_int = jnp.asarray(np.repeat([[1, 4], [3, 2], [4, 4]], 2, axis=0), jnp.int32)
    truth = _exact_bpd(weights, centres, variances, np.asarray(x_int), eps, bins, lo, hi)
    model = gm.score_model(SDE)
    common = dict(num_bins=bins, data_range=(lo, hi), eps=eps, **OPTS)
    tn = pf.bits_per_dim(model, SDE, x_int, key=jax.random.key(3), importance_samples=4,
                         dequantization=pf.TruncatedNormalDequantization(), **common)
    uni = pf.bits_per_dim(model, SDE, x_int, key=jax.random.key(3), importance_samples=4,
                          **common)
    tn1, uni1 = _bound(tn.log_weights, 1), _bound(uni.log_weights, 1)
    # Single draws scatter around their expectation (>= the truth): the mean over 24 draws.
    draws = -np.asarray(tn.log_weights, np.float64)[..., 0] / (2 * math.log(2)) - truth[:, None]
    se = draws.std() / math.sqrt(draws.size)
    assert draws.mean() > -3 * se and draws.mean() < 0.01, (draws.mean(), se)
    assert np.all(np.abs(tn1 - truth) < 0.02), tn1 - truth  # nearly exact with one draw
    assert np.all(uni1 - truth > 10.0)  # uniform puts most of its draws where p_eps is tiny
    assert np.all(np.asarray(tn.bpd) <= tn1 + 1e-6)  # K = 4 below K = 1 (same draws)


def test_dequantization_objects_and_errors():
    u, log_q = pf.UniformDequantization().sample(
        jax.random.key(0), (3, 2), jnp.float32, bin_width=0.1, sde=SDE, eps=1e-5)
    assert u.shape == (3, 2) and np.all(np.asarray(log_q) == 0)
    # Truncated normal: u in [0, 1], log q_u matches scipy's truncnorm density (float64 check).
    from scipy.stats import truncnorm

    bw, eps = 0.05, 1e-3
    u, log_q = pf.TruncatedNormalDequantization().sample(
        jax.random.key(1), (4, 3), jnp.float32, bin_width=bw, sde=SDE, eps=eps)
    scale, std = (float(v) for v in SDE.marginal(eps))
    tau = scale * bw / (2 * std)
    e = (np.asarray(u, np.float64) - 0.5) * 2 * tau
    ref = truncnorm.logpdf(e, -tau, tau).sum(1) + 3 * math.log(2 * tau)
    np.testing.assert_allclose(np.asarray(log_q), ref, rtol=1e-4)
    assert np.all((np.asarray(u) >= 0) & (np.asarray(u) <= 1))
    model = pf.GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)]).score_model(SDE)
    x_int = jnp.zeros((2, 2), jnp.int32)
    # K > 1 with P probes: each draw's probes are averaged inside the log-mean-exp.
    r = pf.bits_per_dim(model, SDE, x_int + 1, key=jax.random.key(5), num_bins=4,
                        data_range=(-2.0, 2.0), num_probes=2, importance_samples=3)
    assert r.log_weights.shape == (2, 3, 2) and r.bpd_probes.shape == (2, 1)
    lw = np.asarray(r.log_weights, np.float64).mean(2)
    np.testing.assert_allclose(np.asarray(r.bpd),
                               -(logsumexp(lw, axis=1) - math.log(3)) / (2 * math.log(2)),
                               rtol=1e-5)
    for bad, match in [(dict(importance_samples=0), "importance_samples"),
                       (dict(dequantization="gaussian"), "dequantization"),
                       (dict(dequantization=pf.TruncatedNormalDequantization(),
                             dequantize=False), "dequantization")]:
        with pytest.raises(ValueError, match=match):
            pf.bits_per_dim(model, SDE, x_int, key=jax.random.key(0), num_bins=4, **bad)


def test_per_example_keys_make_any_subset_reproducible():
    """With one key per example, an example's draws (noise, probes, every importance draw)
    depend on its key alone: a subset solved on its own gives the batch's values for it, and
    a new key for one example moves that example only. One key split B ways is the same as
    passing the B keys."""
    model = _mixture([0.3, 0.7], [[-0.5, 0.2], [0.6, -0.4]], [[0.2, 0.1], [0.1, 0.3]]).score_model(
        SDE)
    x_int = jnp.asarray([[3, 5], [6, 1], [4, 4], [0, 7]], jnp.int32)
    opts = dict(num_bins=8, data_range=(-2.0, 2.0), trace="rademacher", rtol=1e-6, atol=1e-6,
                dequantization=pf.TruncatedNormalDequantization(), importance_samples=2)
    keys = jax.random.split(jax.random.key(11), 4)
    full = pf.bits_per_dim(model, SDE, x_int, key=keys, **opts)
    rows = jnp.asarray([1, 3])
    sub = pf.bits_per_dim(model, SDE, x_int[rows], key=keys[rows], **opts)
    np.testing.assert_allclose(np.asarray(sub.log_weights), np.asarray(full.log_weights)[[1, 3]],
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sub.bpd), np.asarray(full.bpd)[[1, 3]], rtol=0,
                               atol=1e-5)
    moved = pf.bits_per_dim(model, SDE, x_int[rows], key=keys[rows].at[0].set(keys[0]), **opts)
    assert abs(float(moved.bpd[0]) - float(sub.bpd[0])) > 1e-3
    np.testing.assert_allclose(float(moved.bpd[1]), float(sub.bpd[1]), rtol=0, atol=1e-5)
    # log_likelihood and elbo split one key B ways: passing those keys is the same computation.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    key = jax.random.key(3)
    one = pf.log_likelihood(model, SDE, x, key=key, rtol=1e-4, atol=1e-4)
    per = pf.log_likelihood(model, SDE, x, key=jax.random.split(key, 4), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(one.logp), np.asarray(per.logp))
    e1 = pf.elbo(model, SDE, x, key=key, num_times=8, num_reconstruction=2)
    e2 = pf.elbo(model, SDE, x, key=jax.random.split(key, 4), num_times=8, num_reconstruction=2)
    np.testing.assert_array_equal(np.asarray(e1.nll), np.asarray(e2.nll))
    for bad, match in [(keys[:3], r"one per example \(shape \[4\]\), got keys of shape \(3,\)"),
                       (jnp.zeros(3), "key must be a PRNG key"),
                       (jax.random.split(jax.random.key(0), (4, 2)), "shape \\(4, 2\\)")]:
        with pytest.raises(ValueError, match=match):
            pf.bits_per_dim(model, SDE, x_int, key=bad, **opts)
