"""Trace estimators and error bars, against dense Jacobians, closed forms and repeated runs."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._divergence import score_and_forms

# Tight components: the score's Jacobian has a large diagonal, as near image data.
GM3 = pf.GaussianMixture(
    [0.4, 0.6],
    [[1.0, 0.0, -1.0], [-1.0, 0.5, 1.0]],
    [np.diag([0.04, 0.1, 0.02]), [[0.06, 0.02, 0.0], [0.02, 0.05, 0.01], [0.0, 0.01, 0.03]]],
)


def _cv(gm):
    return pf.GaussianControlVariate.fit(gm.sample(jax.random.key(11), 20000))


def _estimators(gm, p):
    return {
        "rademacher": pf.RademacherTrace(p),
        "gaussian": pf.GaussianTrace(p),
        "gaussian_cv": pf.GaussianTrace(p, _cv(gm)),
    }


@eqx.filter_jit
def _fields_at(vf, ts, x, p):
    """(dx, per-probe div, scalar-delta div) of a vector field at the times ts."""
    one = lambda t: vf(t, (x, jnp.zeros((p,))), None) + (vf(t, (x, jnp.zeros(())), None)[1],)
    return jax.vmap(one)(ts)


@pytest.mark.parametrize("sde", [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_vector_field_matches_dense_jacobian(sde, mode):
    """Each estimate is v^T (dF/dx) v on the whole drift, minus the control variate's
    v^T diag(J_G) v - tr J_G, with F and J_G differentiated densely by jax.jacfwd."""
    model = GM3.score_model(sde)
    x = GM3.sample(jax.random.key(0), 1)[0]
    cv = _cv(GM3)
    ts = jnp.array([1e-3, 0.3, 0.9], jnp.float32)

    @jax.jit
    def dense(t):
        f, g2 = sde.drift_coef(t), sde.diffusion(t) ** 2
        drift = lambda xi: f * xi - 0.5 * g2 * model(t, xi)
        m, std = sde.marginal(t)
        jac_g = jnp.diag(f - 0.5 * g2 * (-1.0 / (m**2 * cv.variance + std**2)))
        # The size of the terms that cancel: |f| D + 1/2 g^2 sum |d s_i / d x_i|.
        js = jax.jacfwd(lambda xi: model(t, xi))(x)
        scale = jnp.abs(f) * x.size + 0.5 * g2 * jnp.sum(jnp.abs(jnp.diag(js)))
        return drift(x), jax.jacfwd(drift)(x), jac_g, scale

    drifts, jacs, jac_gs, scale = jax.vmap(dense)(ts)
    scale = scale[:, None]
    for name, est in _estimators(GM3, 5).items():
        v = est.draw(jax.random.key(1), x.shape, x.dtype)
        vf = pf.AugmentedProbabilityFlowODE(model, sde, v, mode, est)
        dx, div, mean_div = _fields_at(vf, ts, x, 5)
        np.testing.assert_allclose(dx, drifts, rtol=1e-5, atol=1e-5)
        want = jnp.einsum("pi,tij,pj->tp", v, jacs, v)
        if name == "gaussian_cv":
            want = want - jnp.einsum("pi,tij,pj->tp", v, jac_gs, v) + jax.vmap(jnp.trace)(
                jac_gs)[:, None]
        assert jnp.all(jnp.abs(div - want) < 1e-5 * scale * jnp.sum(v * v)), (name, div, want)
        # A scalar delta integrates the mean of the estimates.
        assert jnp.all(jnp.abs(mean_div - div.mean(1)) < 1e-5 * scale[:, 0] * 3), name
    vf = pf.AugmentedProbabilityFlowODE(model, sde, None, mode)  # the exact trace
    _, div, _ = _fields_at(vf, ts, x, 1)
    assert jnp.all(jnp.abs(div[:, 0] - jax.vmap(jnp.trace)(jacs)) < 1e-5 * scale[:, 0])


def test_quadratic_forms_one_linearisation():
    """jvp (one vector: jax.jvp; several: one linearisation) and vjp modes give the score and
    the forms v^T (ds/dx) v of a dense Jacobian."""
    model = GM3.score_model(pf.VPSDE())
    x = GM3.sample(jax.random.key(0), 1)[0]
    vs = jax.random.normal(jax.random.key(2), (4, 3))

    @jax.jit
    def run():
        jac = jax.jacfwd(lambda xi: model(0.1, xi))(x)
        out = [score_and_forms(model, 0.1, x, m)(vs[:n]) for m in ("jvp", "vjp") for n in (1, 4)]
        return model(0.1, x), jac, out

    score, jac, out = run()
    for (s, quad), n in zip(out, (1, 4, 1, 4)):
        np.testing.assert_allclose(s, score, rtol=1e-6)
        np.testing.assert_allclose(quad, jnp.einsum("pi,ij,pj->p", vs[:n], jac, vs[:n]),
                                   rtol=1e-5)


def test_estimators_are_unbiased_and_ordered():
    """For each estimator the mean over 768 probes is within 4 standard errors of the exact trace,
    which matches the closed-form log p_eps (prior swapped for the exact p_T); the probe noise
    ranks Rademacher < Gaussian with the control variate < Gaussian on the whole drift."""
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    x0 = GM3.sample(jax.random.key(3), 1)
    opts = dict(rtol=1e-6, atol=1e-6)
    ex = pf.log_likelihood(model, sde, x0, trace="exact", **opts)
    assert ex.exact_trace and ex.logp_probes.shape == (1, 1)
    closed = GM3.log_prob(x0, sde, 1e-5)[0]
    swapped = ex.logp[0] - sde.prior_logp(ex.z[0]) + GM3.log_prob(ex.z, sde, sde.T)[0]
    assert abs(float(swapped - closed)) < 2e-3
    noise = {}
    for name, est in _estimators(GM3, 8).items():
        r = pf.log_likelihood(model, sde, jnp.repeat(x0, 96, 0), key=jax.random.key(1),
                              trace=est, **opts)
        lp = np.asarray(r.logp_probes, np.float64)
        assert lp.shape == (96, 8) and not r.exact_trace
        np.testing.assert_allclose(r.logp, lp.mean(1), rtol=1e-6, atol=1e-5)
        se = lp.std(ddof=1) / math.sqrt(lp.size)
        assert lp.std() > 0.1  # really random
        assert abs(lp.mean() - float(ex.logp[0])) < 4 * se, name
        noise[name] = math.sqrt(np.mean(lp.var(1, ddof=1)))
    # The same Gaussian probes with and without the control variate: the gap is systematic.
    assert noise["rademacher"] < 0.5 * noise["gaussian_cv"], noise
    assert noise["gaussian_cv"] < 0.9 * noise["gaussian"], noise


def test_control_variate_and_rademacher_are_exact_for_diagonal_gaussian_data():
    """For data N(mu, diag(var)), the control variate is the true score, so Gaussian probes with it
    (and Rademacher probes: the Jacobian is diagonal) have no noise at all, and give the closed
    form; the whole-drift Gaussian estimate (the paper's) does have noise."""
    var = np.array([0.02, 0.3, 2.0])
    gm = pf.GaussianMixture([1.0], [[0.5, -0.2, 0.1]], np.diag(var)[None])
    cv = pf.GaussianControlVariate(var)
    for sde in (pf.VPSDE(), pf.VESDE()):
        model = gm.score_model(sde)
        x = gm.sample(jax.random.key(0), 4)
        ref = gm.log_prob(x, sde, 1e-5)
        key = jax.random.key(1)
        traces = [pf.GaussianTrace(6, cv)]
        if isinstance(sde, pf.VPSDE):
            traces.append(pf.RademacherTrace(6))
        for trace in traces:
            r = pf.log_likelihood(model, sde, x, key=key, trace=trace)
            spread = np.asarray(r.logp_probes).std(1)
            assert np.all(spread < 1e-3 * (1 + np.abs(np.asarray(r.logp)))), (sde, trace, spread)
            # The closed form, with the prior swapped for the exact p_T.
            closed = r.logp - jax.vmap(sde.prior_logp)(r.z) + gm.log_prob(r.z, sde, sde.T)
            np.testing.assert_allclose(closed, ref, atol=3e-3)
    r = pf.log_likelihood(model, sde, x, key=key, trace="gaussian", num_probes=6)  # VE
    assert np.asarray(r.logp_probes).std(1).min() > 0.05


def test_strings_become_estimators_and_bad_input():
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    x = GM3.sample(jax.random.key(0), 2)
    key = jax.random.key(0)
    r1 = pf.log_likelihood(model, sde, x, key=key, num_probes=3)  # the default is Rademacher
    r2 = pf.log_likelihood(model, sde, x, key=key, trace=pf.RademacherTrace(3))
    np.testing.assert_array_equal(r1.logp_probes, r2.logp_probes)
    assert r1.logp_probes.shape == (2, 3)
    cv = _cv(GM3)
    r1 = pf.log_likelihood(model, sde, x, key=key, trace="gaussian", control_variate=cv)
    r2 = pf.log_likelihood(model, sde, x, key=key, trace=pf.GaussianTrace(1, cv))
    np.testing.assert_array_equal(r1.logp, r2.logp)
    with pytest.raises(ValueError, match="trace must be one of"):
        pf.log_likelihood(model, sde, x, key=key, trace="hutch")
    with pytest.raises(ValueError, match="control_variate is for trace='gaussian'"):
        pf.log_likelihood(model, sde, x, key=key, control_variate=cv)
    with pytest.raises(ValueError, match="num_probes=2 conflicts"):
        pf.log_likelihood(model, sde, x, key=key, trace=pf.GaussianTrace(3), num_probes=2)
    with pytest.raises(ValueError, match="control_variate goes into the estimator"):
        pf.log_likelihood(model, sde, x, key=key, trace=pf.GaussianTrace(3), control_variate=cv)
    with pytest.raises(ValueError, match="example's shape"):
        pf.log_likelihood(model, sde, x, key=key, trace="gaussian",
                          control_variate=pf.GaussianControlVariate(jnp.ones(4)))
    with pytest.raises(ValueError, match="num_probes must be"):
        pf.RademacherTrace(0)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        pf.log_likelihood(model, sde, x, key=key, num_probes=0)
    with pytest.raises(ValueError, match=">= 0"):
        pf.GaussianControlVariate(jnp.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="divergence_mode"):
        pf.AugmentedProbabilityFlowODE(model, sde, None, "jfp")
    with pytest.raises(ValueError, match="key is required"):
        pf.log_likelihood(model, sde, x, trace=pf.GaussianTrace(2))


def test_dpm_solvers_carry_one_divergence_per_probe():
    """The exponential integrators integrate a [P] delta: each probe's value matches a tight
    Tsit5 solve with the same probes."""
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    x = GM3.sample(jax.random.key(0), 3)
    key = jax.random.key(5)
    ref = pf.log_likelihood(model, sde, x, key=key, num_probes=4, rtol=1e-6, atol=1e-6)
    for solver, steps in ((pf.DPMSolverMultistep(3), 200), (pf.DPMSolver(3), 100)):
        r = pf.log_likelihood(model, sde, x, key=key, num_probes=4, solver=solver, steps=steps)
        np.testing.assert_allclose(r.logp_probes, ref.logp_probes, atol=5e-2)


# --------------------------------------------------------------------------- error bars

K, LO, HI = 32, -3.0, 3.0


def _discretize(x):
    return jnp.clip(jnp.floor((x - LO) / (HI - LO) * K), 0, K - 1).astype(jnp.int32)


def _bpd(model, sde, x_int, key, **kw):
    kw.setdefault("num_probes", 4)
    return pf.bits_per_dim(model, sde, x_int, key=key, num_bins=K, data_range=(LO, HI),
                           rtol=1e-4, atol=1e-4, **kw)


def _chunks(r, n):
    """Split one batched result into results of n examples each (results do not depend on the
    batch, so this equals separate calls)."""
    b = r.bpd.shape[0] // n
    return [jax.tree_util.tree_map(lambda a, i=i: a[i * n:(i + 1) * n], r) for i in range(b)]


def _ratio_ok(a, b, m, sigmas=3.5):
    """a / b is 1 within `sigmas` standard errors of a std estimated from m runs."""
    return abs(a / b - 1) < sigmas / math.sqrt(2 * (m - 1))


def test_summary_matches_a_hand_computed_nested_anova():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(3, 5, 4))
    rs = [pf.BitsPerDimResult(bpd=jnp.asarray(bi.mean(1)), logp=jnp.zeros(5), z=jnp.zeros((5, 1)),
                              nfe=jnp.zeros(5, int), num_steps=jnp.zeros(5, int),
                              bpd_probes=jnp.asarray(bi)) for bi in b]
    s = pf.summarize_bits_per_dim(rs)
    cells = b.mean(2)
    images = cells.mean(0)
    probe_var = np.mean(b.var(2, ddof=1))
    deq_var = np.mean(cells.var(0, ddof=1)) - probe_var / 4
    np.testing.assert_allclose(s.mean, b.mean(), rtol=1e-6)
    np.testing.assert_allclose(s.sem, images.std(ddof=1) / math.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(s.probe_noise, math.sqrt(probe_var), rtol=1e-6)
    np.testing.assert_allclose(s.dequantization_noise, math.sqrt(max(deq_var, 0)), rtol=1e-6)
    image_var = images.var(ddof=1) - max(deq_var, 0) / 3 - probe_var / 12
    np.testing.assert_allclose(s.image_spread, math.sqrt(max(image_var, 0)), rtol=1e-6)
    assert (s.num_images, s.num_repeats, s.num_probes) == (5, 3, 4)
    assert "+-" in str(s) and s.as_dict()["num_probes"] == 4
    one = pf.summarize_bits_per_dim(rs[0].__class__(**{**rs[0].__dict__,
                                                      "bpd_probes": rs[0].bpd_probes[:, :1]}))
    assert math.isnan(one.probe_noise) and math.isnan(one.dequantization_noise)
    assert math.isnan(one.image_spread) and not math.isnan(one.sem)
    with pytest.raises(ValueError, match="same images"):
        pf.summarize_bits_per_dim([rs[0], jax.tree_util.tree_map(lambda a: a[:3], rs[1])])


def test_sem_matches_the_spread_over_fresh_test_sets():
    """sem (images + dequantization + probes) equals the std of the mean over independent test
    sets, and the mean is unbiased against the closed-form density averaged over them."""
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    n, m = 12, 40
    x_int = _discretize(GM3.sample(jax.random.key(7), n * m))
    r = _bpd(model, sde, x_int, jax.random.key(8))
    runs = [pf.summarize_bits_per_dim(c) for c in _chunks(r, n)]
    means = np.array([s.mean for s in runs])
    sem = math.sqrt(np.mean([s.sem**2 for s in runs]))
    assert _ratio_ok(means.std(ddof=1), sem, m), (means.std(ddof=1), sem)
    # Truth: closed-form p_eps at the same dequantized points (prior swapped for exact p_T).
    swap = -(GM3.log_prob(r.z, sde, sde.T) - jax.vmap(sde.prior_logp)(r.z)) / (3 * math.log(2))
    all_ = pf.summarize_bits_per_dim(jax.tree_util.tree_map(
        lambda a: a + swap[:, None] if a.ndim == 2 else a, r))
    k_deq, _ = jax.random.split(jax.random.key(8))
    x = LO + (HI - LO) * (x_int + jax.random.uniform(k_deq, x_int.shape)) / K
    truth = -(GM3.log_prob(x, sde, 1e-5) + 3 * math.log((HI - LO) / K)) / (3 * math.log(2))
    assert abs(all_.mean - float(truth.mean())) < 4 * all_.probe_sem + 2e-3
    assert all_.probe_sem < all_.sem


def test_probe_and_dequantization_noise_match_reruns_on_the_same_images():
    """probe_noise and dequantization_noise, estimated from one run with 2 repeats, predict the
    std of the mean over reruns on the same images; probe_sem alone does so without
    dequantization; and the standard error falls as 1/sqrt(K) with K probes or repeats."""
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    n, m = 8, 40
    x_int = _discretize(GM3.sample(jax.random.key(9), n))
    tiled = jnp.tile(x_int, (m, 1))  # m reruns of the same n images, as one batch
    keys = jax.random.split(jax.random.key(10), 4)

    # Dequantization and probes: one repeat per rerun, 4 probes.
    r1 = _chunks(_bpd(model, sde, tiled, keys[0]), n)
    r2 = _chunks(_bpd(model, sde, tiled, keys[1]), n)
    est = [pf.summarize_bits_per_dim([a, b]) for a, b in zip(r1, r2)]
    sd_d = math.sqrt(np.mean([s.dequantization_noise**2 for s in est]))
    sd_p = math.sqrt(np.mean([s.probe_noise**2 for s in est]))
    assert sd_d > 0.01 and sd_p > 0.01
    predicted = math.sqrt(sd_d**2 / n + sd_p**2 / (n * 4))
    rerun = np.std([pf.summarize_bits_per_dim(a).mean for a in r1], ddof=1)
    assert _ratio_ok(rerun, predicted, m), (rerun, predicted)
    # Two repeats halve the variance of the mean.
    rerun2 = np.std([s.mean for s in est], ddof=1)
    assert _ratio_ok(rerun2 * math.sqrt(2), rerun, m, sigmas=5.0), (rerun, rerun2)

    # Probes only (no dequantization): probe_sem is the rerun std; it halves from 4 to 16 probes.
    for p in (4, 16):
        runs = [pf.summarize_bits_per_dim(c) for c in _chunks(
            _bpd(model, sde, tiled, keys[2], dequantize=False, num_probes=p), n)]
        rerun = np.std([s.mean for s in runs], ddof=1)
        probe_sem = math.sqrt(np.mean([s.probe_sem**2 for s in runs]))
        assert _ratio_ok(rerun, probe_sem, m), (p, rerun, probe_sem)
        if p == 4:
            rerun4, sem4 = rerun, probe_sem
    assert _ratio_ok(rerun4 / rerun, 2.0, m, sigmas=5.0), (rerun4, rerun)
    assert abs(sem4 / probe_sem - 2.0) < 0.2
    # The exact trace has no probe noise.
    ex = _bpd(model, sde, x_int, keys[3], dequantize=False, trace="exact", num_probes=1)
    s = pf.summarize_bits_per_dim(ex)
    assert s.probe_noise == 0.0 and s.probe_sem == 0.0 and s.image_spread == pytest.approx(
        s.spread)


@pytest.mark.slow
def test_shipped_unet_estimators_unbiased_and_ordered():
    """digits-vp: 16 probes of each estimator agree with the exact trace within 4 SE, and the
    probe noise ranks Rademacher < Gaussian with control variate < Gaussian whole drift."""
    model, sde = pf.load_pretrained("digits-vp")
    test = pf.data.load("digits", split="test")
    train = pf.data.load("digits", split="train")
    u = jax.random.uniform(jax.random.key(0), train.images.shape)
    cv = pf.GaussianControlVariate.fit((train.images + u) / 17)
    x_int = jnp.asarray(test.images[:2])
    opts = dict(num_bins=17, rtol=1e-3, atol=1e-3)
    key = jax.random.key(1)
    ex = pf.bits_per_dim(model, sde, x_int, key=key, trace="exact", **opts)
    noise = {}
    for name, trace in (("rad", pf.RademacherTrace(16)), ("cv", pf.GaussianTrace(16, cv)),
                        ("whole", pf.GaussianTrace(16))):
        r = pf.bits_per_dim(model, sde, x_int, key=key, trace=trace, **opts)  # same dequantization
        b = np.asarray(r.bpd_probes)
        sd = b.std(1, ddof=1)
        assert np.all(np.abs(b.mean(1) - np.asarray(ex.bpd)) < 4 * sd / 4 + 5e-3), name
        noise[name] = float(np.sqrt(np.mean(sd**2)))
    assert noise["rad"] < 0.6 * noise["cv"] < 0.6 * noise["whole"], noise
