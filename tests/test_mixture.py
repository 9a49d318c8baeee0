"""The Gaussian-mixture oracle against scipy and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import probflow as pf


def _scipy_logp(gm, x, scale=1.0, var=0.0):
    d = gm.dim
    dens = 0.0
    for w, m, c in zip(np.asarray(gm.weights), np.asarray(gm.means), np.asarray(gm.covs)):
        dens = dens + w * scipy.stats.multivariate_normal(
            scale * m, scale**2 * c + var * np.eye(d)
        ).pdf(x)
    return np.log(dens)


def test_log_prob_matches_scipy(mixture2d, sde):
    x = np.array([[0.1, 0.2], [-1.0, 0.4], [2.0, -1.0]])
    np.testing.assert_allclose(mixture2d.log_prob(x), _scipy_logp(mixture2d, x), rtol=1e-5)
    for t in [1e-3, 0.3, 1.0]:
        scale, std = (float(v) for v in sde.marginal(t))
        np.testing.assert_allclose(
            mixture2d.log_prob(x, sde, t), _scipy_logp(mixture2d, x, scale, std**2), rtol=1e-5
        )


@pytest.mark.usefixtures("x64")
def test_score_matches_finite_differences(mixture2d):
    gm = pf.GaussianMixture(mixture2d.weights, mixture2d.means, mixture2d.covs)
    sde = pf.SubVPSDE()
    model = gm.score_model(sde)
    x = np.array([0.3, -0.7])
    for t in [1e-4, 0.2, 0.9]:
        h = 1e-6
        fd = [
            (_scipy_logp(gm, x + h * e, *_sv(sde, t)) - _scipy_logp(gm, x - h * e, *_sv(sde, t)))
            / (2 * h)
            for e in np.eye(2)
        ]
        np.testing.assert_allclose(model(t, jnp.asarray(x)), fd, rtol=1e-5, atol=1e-6)


def _sv(sde, t):
    scale, std = sde.marginal(t)
    return float(scale), float(std) ** 2


def test_classifier_is_exact_posterior(mixture2d, sde):
    clf = mixture2d.classifier(sde)
    x = jnp.array([0.2, 0.1])
    t = 0.3
    scale, var = _sv(sde, t)
    joint = [
        w * scipy.stats.multivariate_normal(scale * m, scale**2 * c + var * np.eye(2)).pdf(x)
        for w, m, c in zip(
            np.asarray(mixture2d.weights), np.asarray(mixture2d.means), np.asarray(mixture2d.covs)
        )
    ]
    post = np.asarray(joint) / np.sum(joint)
    np.testing.assert_allclose(jnp.exp(clf(t, x)), post, rtol=1e-5)


def test_sample_moments(mixture2d):
    xs = np.asarray(mixture2d.sample(jax.random.key(0), 40000))
    w, m, c = (np.asarray(a) for a in (mixture2d.weights, mixture2d.means, mixture2d.covs))
    mean = (w[:, None] * m).sum(0)
    second = sum(wk * (ck + np.outer(mk, mk)) for wk, mk, ck in zip(w, m, c))
    cov = second - np.outer(mean, mean)
    np.testing.assert_allclose(xs.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(np.cov(xs.T), cov, atol=0.05)


def test_condition_matches_bayes(mixture2d):
    """p(x2 | x1 = v) by brute-force normalisation on a grid."""
    cond = mixture2d.condition([True, False], [0.4])
    grid = np.linspace(-6, 6, 6001)
    pts = np.stack([np.full_like(grid, 0.4), grid], axis=1)
    joint = np.exp(_scipy_logp(mixture2d, pts))
    ref = joint / np.trapezoid(joint, grid)
    got = np.exp(np.asarray(cond.log_prob(grid[:, None])))
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-4)


def test_bad_mixtures():
    with pytest.raises(ValueError, match="means must have shape"):
        pf.GaussianMixture([1.0], [[0.0, 0.0], [1.0, 1.0]], np.eye(2)[None])
    with pytest.raises(ValueError, match="positive definite"):
        pf.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="weights"):
        pf.GaussianMixture([-1.0], [[0.0]], [[[1.0]]])
    gm = pf.GaussianMixture([1.0], [[0.0, 0.0]], np.eye(2)[None])
    with pytest.raises(ValueError, match="x must have shape"):
        gm.log_prob(np.zeros((3, 3)))
