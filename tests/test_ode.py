"""The probability-flow ODE core against closed forms, float64 re-solves and host counters."""

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from helpers import Counting, host_count

import probflow as pf


def _closed_form_check(gm, sde, model, x, r):
    """log p_eps(x) = log p_T(z) + int div: swap the prior for the mixture's exact p_T."""
    est = r.logp - jax.vmap(sde.prior_logp)(r.z) + gm.log_prob(r.z, sde, sde.T)
    return est, gm.log_prob(x, sde, 1e-5)


def test_exact_trace_likelihood_matches_closed_form(mixture2d, sde):
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 16)
    r = pf.log_likelihood(model, sde, x, trace="exact")
    est, ref = _closed_form_check(mixture2d, sde, model, x, r)
    np.testing.assert_allclose(est, ref, atol=3e-3)
    assert r.logp.shape == (16,) and r.z.shape == (16, 2) and r.nfe.shape == (16,)
    # The raw estimate differs from the truth only by log p_T(z) - prior_logp(z).
    np.testing.assert_array_less(0, r.nfe)


@pytest.mark.usefixtures("x64")
def test_float64_matches_closed_form_to_1e_6(mixture2d, sde):
    gm = pf.GaussianMixture(mixture2d.weights, mixture2d.means, mixture2d.covs)
    model = gm.score_model(sde)
    x = gm.sample(jax.random.key(0), 4)
    assert x.dtype == jnp.float64
    r = pf.log_likelihood(model, sde, x, trace="exact", rtol=1e-10, atol=1e-10)
    assert r.logp.dtype == jnp.float64
    est, ref = _closed_form_check(gm, sde, model, x, r)
    np.testing.assert_allclose(est, ref, atol=1e-6)
    z = pf.encode(model, sde, x, rtol=1e-10, atol=1e-10).z
    back = pf.decode(model, sde, z, rtol=1e-10, atol=1e-10).x
    np.testing.assert_allclose(back, x, atol=1e-6)


@pytest.mark.parametrize("trace", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(trace):
    """The mean of many single-probe estimates matches the exact trace within 4 SE."""
    gm = pf.GaussianMixture(
        [0.5, 0.5], [[1.0, 0.0, -1.0], [-1.0, 0.5, 1.0]], [np.eye(3) * 0.4, np.eye(3) * 0.7]
    )
    sde = pf.VPSDE()
    model = gm.score_model(sde)
    x0 = gm.sample(jax.random.key(3), 1)
    exact = pf.log_likelihood(model, sde, x0, trace="exact", rtol=1e-6, atol=1e-6).logp[0]
    n = 400
    xs = jnp.repeat(x0, n, axis=0)
    r = pf.log_likelihood(model, sde, xs, key=jax.random.key(1), trace=trace, rtol=1e-6, atol=1e-6)
    est = np.asarray(r.logp)
    se = est.std(ddof=1) / math.sqrt(n)
    assert est.std() > 1e-3  # the probes really are random and differ per example
    assert abs(est.mean() - float(exact)) < 4 * se
    # Averaging probes reduces the variance roughly by their number.
    r4 = pf.log_likelihood(
        model, sde, xs[:100], key=jax.random.key(2), trace=trace, num_probes=4, rtol=1e-6,
        atol=1e-6,
    )
    assert np.asarray(r4.logp).std() < 0.75 * est.std()


def test_encode_decode_round_trip_and_scipy_latent(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(5), 8)
    enc = pf.encode(model, sde, x)
    dec = pf.decode(model, sde, enc.z)
    rel = jnp.linalg.norm(dec.x - x, axis=1) / jnp.linalg.norm(x, axis=1)
    assert float(rel.max()) < 1e-3

    # Independent reference: scipy's DOP853 in float64 on the same ODE, with the mixture's score
    # written out in numpy.
    w, m, c = (
        np.asarray(a, np.float64) for a in (mixture2d.weights, mixture2d.means, mixture2d.covs)
    )

    def score(t, y):
        scale, std = (float(v) for v in sde.marginal(t))
        logs, grads = [], []
        for wk, mk, ck in zip(w, m, c):
            cov = scale**2 * ck + std**2 * np.eye(2)
            prec = np.linalg.inv(cov)
            diff = y - scale * mk
            _, logdet = np.linalg.slogdet(2 * np.pi * cov)
            logs.append(np.log(wk) - 0.5 * (logdet + diff @ prec @ diff))
            grads.append(-prec @ diff)
        logs = np.asarray(logs)
        r = np.exp(logs - logs.max())
        r /= r.sum()
        return sum(rk * gk for rk, gk in zip(r, grads))

    def rhs(t, y):
        f, g = float(sde.drift_coef(t)), float(sde.diffusion(t))
        return f * y - 0.5 * g * g * score(t, y)

    for i in range(2):
        sol = scipy.integrate.solve_ivp(
            rhs, (1e-3, 1.0), np.asarray(x[i], np.float64), method="DOP853", rtol=1e-9, atol=1e-9
        )
        np.testing.assert_allclose(enc.z[i], sol.y[:, -1], rtol=1e-3, atol=1e-4)


def test_bits_per_dim_formula_deterministic():
    """Under VP, N(0, I) data stays N(0, I): the prior is exact and so is the bpd."""
    gm = pf.GaussianMixture([1.0], [[0.0, 0.0, 0.0]], np.eye(3)[None])
    sde = pf.VPSDE()
    model = gm.score_model(sde)
    x_int = jnp.array([[0, 5, 9], [3, 3, 3], [7, 1, 8]])
    k, lo, hi = 10, -3.0, 3.0
    r = pf.bits_per_dim(
        model, sde, x_int, num_bins=k, data_range=(lo, hi), dequantize=False, trace="exact"
    )
    x = lo + (hi - lo) * (np.asarray(x_int) + 0.5) / k
    logp = scipy.stats.norm.logpdf(x).sum(1)
    d = 3
    ref = -(logp + d * math.log((hi - lo) / k)) / (d * math.log(2))
    np.testing.assert_allclose(r.bpd, ref, atol=2e-3)
    np.testing.assert_allclose(r.logp, logp, atol=5e-3)


def test_bits_per_dim_dequantization_expectation():
    """E_u[bpd] over uniform dequantization equals the integral over each bin (scipy quad)."""
    gm = pf.GaussianMixture([1.0], [[0.0]], np.eye(1)[None])
    sde = pf.VPSDE()
    model = gm.score_model(sde)
    k, lo, hi, level = 8, -2.0, 2.0, 5
    n = 1500
    x_int = jnp.full((n, 1), level)
    r = pf.bits_per_dim(
        model, sde, x_int, key=jax.random.key(0), num_bins=k, data_range=(lo, hi), trace="exact"
    )
    bpd = np.asarray(r.bpd)
    width = (hi - lo) / k

    def bpd_at(u):
        x = lo + (hi - lo) * (level + u) / k
        return -(scipy.stats.norm.logpdf(x) + math.log(width)) / math.log(2)

    expected = scipy.integrate.quad(bpd_at, 0.0, 1.0)[0]
    se = bpd.std(ddof=1) / math.sqrt(n)
    assert bpd.std() > 0  # the noise really differs per example
    assert abs(bpd.mean() - expected) < 4 * se + 1e-3
    # Every value lies within the bin's range of bpd values.
    lo_b, hi_b = sorted([bpd_at(0.0), bpd_at(1.0)])
    assert bpd.min() >= lo_b - 1e-2 and bpd.max() <= hi_b + 1e-2


def test_sample_ode_moments(mixture2d, sde):
    model = mixture2d.score_model(sde)
    r = pf.sample_ode(model, sde, 2000, (2,), key=jax.random.key(7), rtol=1e-4, atol=1e-4)
    xs = np.asarray(r.x)
    ref = np.asarray(mixture2d.sample(jax.random.key(8), 200000))
    se = ref.std(0) / math.sqrt(2000)
    np.testing.assert_array_less(np.abs(xs.mean(0) - ref.mean(0)), 4.5 * se)
    np.testing.assert_allclose(np.cov(xs.T), np.cov(ref.T), atol=0.08)
    # Mode weights: the fraction of samples closer to the first mode.
    first = lambda a: np.mean(np.linalg.norm(a - np.asarray(mixture2d.means[0]), axis=1)
                              < np.linalg.norm(a - np.asarray(mixture2d.means[1]), axis=1))
    assert abs(first(xs) - first(ref)) < 0.035


SOLVERS = [
    (diffrax.Euler(), 9),
    (diffrax.Heun(), None),
    (diffrax.Midpoint(), 9),
    (diffrax.Bosh3(), None),
    (diffrax.Tsit5(), None),
    (diffrax.Tsit5(), 9),
    (diffrax.Dopri5(), None),
    (diffrax.Dopri8(), None),
    (diffrax.Dopri8(), 5),
    (diffrax.ReversibleHeun(), None),
    (diffrax.LeapfrogMidpoint(), 9),
]


@pytest.mark.parametrize(
    "solver,steps", SOLVERS, ids=[f"{type(s).__name__}-{n}" for s, n in SOLVERS]
)
def test_nfe_matches_host_counter(mixture2d, solver, steps):
    sde = pf.VPSDE()
    model = Counting(mixture2d.score_model(sde))
    x = mixture2d.sample(jax.random.key(0), 1)
    opts = dict(solver=solver, steps=steps, rtol=1e-4, atol=1e-4)
    for run in (
        lambda: pf.encode(model, sde, x, **opts),
        lambda: pf.decode(model, sde, x, **opts),
        lambda: pf.log_likelihood(model, sde, x, key=jax.random.key(1), **opts),
    ):
        count, r = host_count(run)
        assert int(r.nfe[0]) == count
        assert int(r.nfe[0]) > int(r.num_steps[0]) or isinstance(
            solver, (diffrax.Euler, diffrax.LeapfrogMidpoint)
        )


def test_nfe_counts_rejected_steps(mixture2d):
    """A loose first step forces rejections; they are paid for in nfe."""
    sde = pf.VESDE()
    model = Counting(mixture2d.score_model(sde))
    x = mixture2d.sample(jax.random.key(0), 1)
    count, r = host_count(lambda: pf.encode(model, sde, x, rtol=1e-7, atol=1e-7))
    assert int(r.nfe[0]) == count
    # Tsit5 with FSAL: 2 (initial step) + 7 + 6 (steps - 1); any mismatch means a miscount.
    assert int(r.nfe[0]) == 2 + 7 + 6 * (int(r.num_steps[0]) - 1)


def test_no_retrace_on_second_call(mixture2d):
    traces = [0]

    class Traced(eqx.Module):
        inner: eqx.Module

        def __call__(self, t, x):
            traces[0] += 1
            return self.inner(t, x)

    sde = pf.VPSDE()
    model = Traced(mixture2d.score_model(sde))
    x = mixture2d.sample(jax.random.key(0), 4)
    for fn in (
        lambda m, xx: pf.encode(m, sde, xx),
        lambda m, xx: pf.log_likelihood(m, sde, xx, key=jax.random.key(0)),
        lambda m, xx: pf.sample_ode(m, sde, 4, (2,), key=jax.random.key(1)),
    ):
        fn(model, x)
        before = traces[0]
        fn(model, x + 1.0)
        fn(Traced(mixture2d.score_model(sde)), x)  # an equal model with new arrays
        assert traces[0] == before


def test_results_do_not_depend_on_the_batch(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 5)
    alone = pf.encode(model, sde, x[:1])
    together = pf.encode(model, sde, x)
    np.testing.assert_allclose(alone.z[0], together.z[0], rtol=1e-6, atol=1e-6)
    assert int(alone.nfe[0]) == int(together.nfe[0])


def test_fixed_steps_converge_with_solver_order(mixture2d):
    """Halving the step of Heun (order 2) cuts the decode error about 4x."""
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    z = jax.random.normal(jax.random.key(0), (8, 2))
    ref = pf.decode(model, sde, z, rtol=1e-8, atol=1e-8).x
    errs = [
        float(jnp.abs(pf.decode(model, sde, z, solver=diffrax.Heun(), steps=n).x - ref).max())
        for n in (100, 200)
    ]
    assert 2.8 < errs[0] / errs[1] < 5.5


def test_bad_input(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 2)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="eps must lie in"):
        pf.encode(model, sde, x, eps=0.0)
    with pytest.raises(ValueError, match="eps must lie in"):
        pf.log_likelihood(model, sde, x, key=key, eps=1.5)
    with pytest.raises(ValueError, match="trace must be one of"):
        pf.log_likelihood(model, sde, x, key=key, trace="hutch")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pf.decode(model, sde, x, steps=0)
    with pytest.raises(ValueError, match="key is required"):
        pf.log_likelihood(model, sde, x)
    with pytest.raises(ValueError, match="shape"):
        pf.encode(model, sde, jnp.zeros((2, 3)))  # the model is 2-d
    with pytest.raises(ValueError, match="shape"):
        pf.sample_ode(model, sde, 3, (0,), key=key)
    with pytest.raises(ValueError, match="x_int must be an integer array"):
        pf.bits_per_dim(model, sde, x, key=key)
    with pytest.raises(ValueError, match="no error estimate"):
        pf.encode(model, sde, x, solver=diffrax.Euler())
    with pytest.raises(ValueError, match="rtol"):
        pf.encode(model, sde, x, rtol=-1.0)
    with pytest.raises(ValueError, match="not supported"):
        pf.encode(model, sde, x, solver=diffrax.Kvaerno5())
    with pytest.raises(ValueError, match="floating-point"):
        pf.encode(model, sde, jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(Exception, match="x contains NaN or inf"):
        pf.encode(model, sde, x.at[0, 0].set(jnp.nan))
    with pytest.raises(Exception, match=r"x_int must hold integers in \[0, num_bins=4\)"):
        pf.bits_per_dim(model, sde, jnp.array([[0, 4]]), key=key, num_bins=4)
    with pytest.raises(Exception, match="max_steps=3"):
        pf.encode(model, sde, x, max_steps=3)


def test_sqrt_time_change_is_exact(mixture2d):
    """Solving in u = sqrt(t) changes the steps, not the answer."""
    sde = pf.VPSDE()
    model = Counting(mixture2d.score_model(sde))
    x = mixture2d.sample(jax.random.key(0), 4)
    count, r = host_count(lambda: pf.log_likelihood(model, sde, x[:1], trace="exact",
                                                    time="sqrt_t"))
    assert int(r.nfe[0]) == count
    r = pf.log_likelihood(model, sde, x, trace="exact", time="sqrt_t")
    est, ref = _closed_form_check(mixture2d, sde, model, x, r)
    np.testing.assert_allclose(est, ref, atol=3e-3)
    with pytest.raises(ValueError, match="sqrt_t"):
        pf.decode(model, sde, x, time="sqrt_t", solver=pf.DPMSolver(order=2), steps=5)
