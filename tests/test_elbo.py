"""`pf.elbo`: the continuous-time variational bound (Song, Durkan, Murray, Ermon 2021, Theorem 2).

References: (1) a standard normal under VP, whose exact score is -x, so the bound's expectation is
closed form, reconstruction term included; (2) Gaussian mixtures with their exact scores, where
the bound equals -log p(x) up to Monte Carlo error (the prior mismatch at T and the O(eps)
reconstruction gap are far below it), and a 0.8x score lies strictly above; (3) the importance
density of t recorded from score_flow's released code (tests/data/score_flow_importance.json, its
likelihood_importance_cum_weight and bisection sampler, float64); (4) the shipped digits U-Net.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf

FIXTURE = Path(__file__).parent / "data" / "score_flow_importance.json"
GM = pf.GaussianMixture(
    [0.4, 0.6], [[-1.0, 0.8], [1.0, -0.5]], [np.eye(2) * 0.2, [[0.3, 0.1], [0.1, 0.25]]]
)


def test_standard_normal_closed_form():
    """Data N(0, I) under VP: p_t = N(0, I), score -x. E[bound] is closed form (eps = 0.05 makes
    the reconstruction gap visible): prior + diffusion = D/2 log 2pi + a^2 |x|^2 / 2
    + D (1 - a^2) / 2, reconstruction = -D log a + (a^4 D + std^2 a^2 |x|^2 - D) / 2."""
    sde, eps, d = pf.VPSDE(), 0.05, 3
    n = 256
    x = jax.random.normal(jax.random.key(0), (n, d)) * 1.3
    r = pf.elbo(lambda t, y: -y, sde, x, key=jax.random.key(1), num_times=1024,
                num_reconstruction=64, eps=eps)
    a, std = (float(v) for v in sde.marginal(eps))
    sq = np.sum(np.asarray(x, np.float64) ** 2, axis=1)
    expected = (0.5 * d * math.log(2 * math.pi) + 0.5 * a * a * sq + 0.5 * d * (1 - a * a)
                - d * math.log(a) + 0.5 * (a**4 * d + std * std * a * a * sq - d))
    err = np.asarray(r.nll, np.float64) - expected
    se = np.asarray(r.stderr, np.float64)
    assert np.all(np.isfinite(se)) and np.all(se > 0)
    # The mean is unbiased and the standard errors are calibrated (z-scores of unit spread).
    se_mean = math.sqrt(np.sum(se**2)) / n
    assert abs(err.mean()) < 4 * se_mean, (err.mean(), se_mean)
    assert 0.8 < np.std(err / se) < 1.25, np.std(err / se)
    # The terms add up and the prior term is exact.
    np.testing.assert_allclose(np.asarray(r.prior + r.diffusion + r.reconstruction),
                               np.asarray(r.nll), rtol=1e-6)
    a1, s1 = (float(v) for v in sde.marginal(1.0))
    np.testing.assert_allclose(np.asarray(r.prior),
                               0.5 * d * math.log(2 * math.pi) + 0.5 * (a1 * a1 * sq + d * s1 * s1),
                               rtol=1e-5)
    assert np.all(np.asarray(r.nfe) == 1024 + 64)


@pytest.mark.parametrize("sde", [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE(sigma_max=20.0)],
                         ids=["vp", "subvp", "ve"])
def test_exact_score_is_tight_and_a_wrong_score_is_above(sde):
    model = GM.score_model(sde)
    x = GM.sample(jax.random.key(2), 8)
    truth = -np.asarray(GM.log_prob(x), np.float64)
    exact = pf.elbo(model, sde, x, key=jax.random.key(3), num_times=1024, num_reconstruction=64)
    se = float(np.sqrt(np.sum(np.asarray(exact.stderr, np.float64) ** 2))) / 8
    gap = float(np.mean(np.asarray(exact.nll) - truth))
    assert se < 0.25 and abs(gap) < 4 * se, (gap, se)
    # 0.8x the score: over data the bound exceeds the exact one by KL(p || p_wrong) + its own gap
    # > 0. With the same draws for both (common random numbers) the excess is nearly free of Monte
    # Carlo noise; what is left is the spread between examples.
    x = GM.sample(jax.random.key(4), 64)
    kw = dict(key=jax.random.key(5), num_times=128, num_reconstruction=8)
    exact = pf.elbo(model, sde, x, **kw)
    wrong = pf.elbo(lambda t, y: 0.8 * model(t, y), sde, x, **kw)
    excess = np.asarray(wrong.nll, np.float64) - np.asarray(exact.nll, np.float64)
    assert excess.mean() > 0.1 and excess.mean() > 4 * excess.std() / 8, excess


@pytest.mark.parametrize("name,sde", [("vp", pf.VPSDE()), ("subvp", pf.SubVPSDE())])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_importance_density_matches_score_flow(name, sde, eps, x64):
    """score_flow's cumulative weight int_eps^t g^2 / std^2 is 2 (lambda(eps) - lambda(t)), and
    its bisection sampler's time for quantile q is lambda^-1(lambda(eps) - q Z / 2). (score_flow
    replaces 1 - exp(-B) by B where B < 1e-3, a relative error up to 5e-4: the tolerance.)"""
    ref = json.loads(FIXTURE.read_text())[f"{name}_eps{eps:g}"]
    lam_eps = float(sde.log_snr(eps))
    z = 2 * (lam_eps - float(sde.log_snr(1.0)))
    np.testing.assert_allclose(z, ref["Z"], rtol=1e-5)
    cum = [2 * (lam_eps - float(sde.log_snr(t))) for t in ref["t"]]
    np.testing.assert_allclose(cum, ref["cum_weight"], rtol=5e-4, atol=5e-4)
    times = [float(sde.time_of_log_snr(lam_eps - q * z / 2)) for q in ref["quantiles"]]
    np.testing.assert_allclose(times, ref["time_samples"], rtol=5e-4)


def test_chunking_and_options():
    sde = pf.VPSDE()
    model = GM.score_model(sde)
    x = GM.sample(jax.random.key(4), 3)
    kw = dict(key=jax.random.key(5), num_times=64, num_reconstruction=4)
    a = pf.elbo(model, sde, x, **kw)
    b = pf.elbo(model, sde, x, chunk_size=7, **kw)  # 204 pairs in 30 calls, the last padded
    np.testing.assert_allclose(np.asarray(a.nll), np.asarray(b.nll), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.stderr), np.asarray(b.stderr), rtol=1e-4)
    assert np.all(np.asarray(a.nfe) == 68)
    for bad, match in [(dict(num_times=3), "num_times"), (dict(num_reconstruction=1),
                                                          "num_reconstruction"),
                       (dict(chunk_size=0), "chunk_size"), (dict(eps=0.0), "eps")]:
        with pytest.raises(ValueError, match=match):
            pf.elbo(model, sde, x, key=jax.random.key(0), **bad)
    with pytest.raises(ValueError, match="method"):
        pf.bits_per_dim(model, sde, jnp.zeros((1, 2), jnp.int32), key=jax.random.key(0),
                        method="vlb")


def test_digits_unet_elbo_above_ode():
    """On the shipped U-Net: finite, nfe as documented, and the bound (a bound on the SDE model's
    -log p) lies above the ODE's bits/dim on average, within their errors."""
    model, sde = pf.load_pretrained("digits-vp")
    ds = pf.data.load("digits", split="test")
    x_int = jnp.asarray(ds.images[:4])
    kw = dict(key=jax.random.key(0), num_bins=ds.num_bins)
    ode = pf.bits_per_dim(model, sde, x_int, **kw)
    bound = pf.VariationalBound(num_times=128, num_reconstruction=8)
    vb = pf.bits_per_dim(model, sde, x_int, method=bound, **kw)
    assert np.all(np.isfinite(np.asarray(vb.bpd))) and vb.z is None
    assert np.all(np.asarray(vb.nfe) == 136)
    assert vb.bpd_probes.shape == (4, 1) and vb.log_weights.shape == (4, 1, 1)
    # Same dequantization (same key): the ELBO's per-image excess is positive on average.
    e = pf.elbo(model, sde, jnp.zeros((1, 8, 8, 1)), key=jax.random.key(1), num_times=8,
                num_reconstruction=2)
    assert np.isfinite(float(e.nll[0]))
    excess = float(np.mean(np.asarray(vb.bpd) - np.asarray(ode.bpd)))
    assert excess > -0.1, excess
    assert float(np.mean(np.asarray(vb.bpd))) < float(np.mean(np.asarray(ode.bpd))) + 1.0
