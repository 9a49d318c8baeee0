"""Stochastic samplers: the reverse SDE (sample_sde) and predictor-corrector (sample_pc).

Independent references: exact scores and exact samples of a 2-d Gaussian mixture under each SDE
(conftest.mixture2d), a host-side counter of score evaluations, and numpy for the metric.
"""

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_SDES, SDE_IDS
from helpers import Counting, host_count

import probflow as pf
from probflow._reverse_sde import _sample_pc

N = 3000  # samples per quality check
SW_KEY = jax.random.key(12345)
SW_PROJ = 256


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def exact(mixture2d):
    """Exact samples of p_0 and the noise floor of the sliced Wasserstein distance at size N."""
    ref = np.asarray(mixture2d.sample(jax.random.key(1000), N))
    floors = []
    for i in range(3):
        a = mixture2d.sample(jax.random.key(2000 + 2 * i), N)
        b = mixture2d.sample(jax.random.key(2001 + 2 * i), N)
        floors.append(float(pf.sliced_wasserstein(a, b, key=SW_KEY, num_projections=SW_PROJ)))
    return ref, float(np.mean(floors))


def assert_matches_mixture(x, mixture, exact):
    """Means, covariances, mode weights and sliced Wasserstein distance against the mixture."""
    ref, floor = exact
    x = np.asarray(x, np.float64)
    assert x.shape == (N, 2)
    assert np.all(np.isfinite(x))
    w = np.asarray(mixture.weights, np.float64)
    mu = np.asarray(mixture.means, np.float64)
    cov = np.asarray(mixture.covs, np.float64)
    mean = w @ mu
    d = mu - mean
    total_cov = np.einsum("k,kij->ij", w, cov) + np.einsum("k,ki,kj->ij", w, d, d)
    # Standard errors at N = 3000: mean ~0.025, covariance entries ~0.045.
    np.testing.assert_allclose(x.mean(0), mean, atol=0.1)
    np.testing.assert_allclose(np.cov(x.T), total_cov, atol=0.16)
    # Mode weights: E_p[p(k | x)] = w_k exactly, so the mean posterior estimates the weights.
    clf = mixture.classifier(pf.VPSDE())
    post = np.exp(np.asarray(jax.vmap(lambda xi: clf(0.0, xi))(jnp.asarray(x, jnp.float32))))
    np.testing.assert_allclose(post.mean(0), w, atol=0.035)
    sw = float(pf.sliced_wasserstein(x, ref, key=SW_KEY, num_projections=SW_PROJ))
    assert sw <= 2.5 * floor, f"sliced Wasserstein {sw:.4f} > 2.5 x noise floor {floor:.4f}"


# --------------------------------------------------------------------------- metric


def test_sliced_wasserstein_against_references():
    rng = np.random.default_rng(0)
    # 1-d: SW_2 is W_2 between empirical measures, sqrt(mean (sorted x - sorted y)^2).
    x1, y1 = rng.normal(size=(500, 1)), rng.normal(1.0, 2.0, size=(500, 1))
    w2 = math.sqrt(np.mean((np.sort(x1[:, 0]) - np.sort(y1[:, 0])) ** 2))
    sw1 = float(pf.sliced_wasserstein(x1, y1, key=jax.random.key(0), num_projections=4))
    assert sw1 == pytest.approx(w2, rel=1e-5)
    # A shift v in d = 2: every projection is shifted by theta.v, so SW_2^2 = E(theta.v)^2
    # = |v|^2 / d for uniform directions.
    x = rng.normal(size=(800, 2))
    v = np.array([0.6, -0.8])
    sw = float(pf.sliced_wasserstein(x, x + v, key=jax.random.key(1), num_projections=4096))
    assert sw == pytest.approx(np.linalg.norm(v) / math.sqrt(2), rel=0.04)
    assert float(pf.sliced_wasserstein(x, x, key=jax.random.key(1))) == 0.0
    with pytest.raises(ValueError, match="same dimension"):
        pf.sliced_wasserstein(x, x1, key=jax.random.key(0))


def test_quality_check_rejects_wrong_samples(mixture2d, exact):
    """The mixture check can fail: slightly wrong distributions are rejected."""
    ref, _ = exact
    good = np.asarray(mixture2d.sample(jax.random.key(5), N))
    assert_matches_mixture(good, mixture2d, exact)
    wrong_weights = pf.GaussianMixture(
        [0.45, 0.55], mixture2d.means, mixture2d.covs
    ).sample(jax.random.key(6), N)
    too_wide = good.mean(0) + 1.15 * (good - good.mean(0))
    for bad in (wrong_weights, too_wide):
        with pytest.raises(AssertionError):
            assert_matches_mixture(bad, mixture2d, exact)


# --------------------------------------------------------------------------- quality

STEPS = 200  # PC noise levels
SDE_STEPS = 100  # reverse-SDE steps (each evaluates the Brownian tree)

SAMPLERS = {
    "sde-euler": lambda m, s, k: pf.sample_sde(m, s, N, (2,), key=k, steps=SDE_STEPS),
    "pc-rd-langevin": lambda m, s, k: pf.sample_pc(m, s, N, (2,), key=k, steps=STEPS),
    "pc-ancestral-annealed": lambda m, s, k: pf.sample_pc(
        m, s, N, (2,), key=k, steps=STEPS, predictor=pf.AncestralSamplingPredictor(),
        corrector=pf.AnnealedLangevinCorrector(snr=0.16, steps=1),
    ),
    "pc-em-none": lambda m, s, k: pf.sample_pc(
        m, s, N, (2,), key=k, steps=STEPS, predictor=pf.EulerMaruyamaPredictor(),
        corrector=None, denoise=False,
    ),
}
SLOW_SAMPLERS = {
    "sde-sra1": lambda m, s, k: pf.sample_sde(
        m, s, N, (2,), key=k, steps=100, solver=diffrax.SRA1()
    ),
    "sde-shark-adaptive": lambda m, s, k: pf.sample_sde(
        m, s, N, (2,), key=k, steps=None, solver=diffrax.ShARK(), rtol=1e-2, atol=1e-2
    ),
    "pc-em-langevin2": lambda m, s, k: pf.sample_pc(
        m, s, N, (2,), key=k, steps=STEPS, predictor=pf.EulerMaruyamaPredictor(),
        corrector=pf.LangevinCorrector(snr=0.16, steps=2),
    ),
    "pc-rd-none": lambda m, s, k: pf.sample_pc(m, s, N, (2,), key=k, steps=STEPS,
                                               corrector=None),
    "pc-flow-langevin": lambda m, s, k: pf.sample_pc(
        m, s, N, (2,), key=k, steps=STEPS, predictor=pf.ProbabilityFlowPredictor()),
}


# The default suite: the two main samplers under all three SDEs, plus the other predictors and
# the annealed corrector once each; the full matrix runs with the slow tests.
DEFAULT_CASES = [
    ("sde-euler", "vp"), ("sde-euler", "subvp"), ("sde-euler", "ve"),
    ("pc-rd-langevin", "vp"), ("pc-rd-langevin", "subvp"), ("pc-rd-langevin", "ve"),
    ("pc-ancestral-annealed", "ve"), ("pc-em-none", "subvp"),
]


def _cases(samplers, *, default):
    out = []
    for name in samplers:
        for sde, sid in zip(ALL_SDES, SDE_IDS):
            if "ancestral" in name and isinstance(sde, pf.SubVPSDE):
                continue
            if ((name, sid) in DEFAULT_CASES) == default:
                out.append(pytest.param(name, sde, id=f"{name}-{sid}"))
    return out


ALL_SAMPLERS = {**SAMPLERS, **SLOW_SAMPLERS}


@pytest.mark.parametrize("name,sde", _cases(SAMPLERS, default=True))
def test_samplers_match_mixture(name, sde, mixture2d, exact):
    r = SAMPLERS[name](mixture2d.score_model(sde), sde, jax.random.key(1))
    assert_matches_mixture(r.x, mixture2d, exact)


@pytest.mark.slow
@pytest.mark.parametrize("name,sde", _cases(ALL_SAMPLERS, default=False))
def test_more_samplers_match_mixture(name, sde, mixture2d, exact):
    r = ALL_SAMPLERS[name](mixture2d.score_model(sde), sde, jax.random.key(2))
    assert_matches_mixture(r.x, mixture2d, exact)


# --------------------------------------------------------------------------- Langevin rule


def _langevin_chain(corrector, score, sde, t, x, key, alpha=1.0):
    def one(xi, k):
        return corrector.correct(score, sde, t, jnp.asarray(alpha), xi, k)

    return jax.jit(jax.vmap(one))(x, jax.random.split(key, x.shape[0]))


class _PerSampleNormCorrector(pf.AbstractCorrector):
    """Algorithm 4 with per-sample norms: the rule probflow does NOT use (biased, see docs)."""

    snr: float
    steps: int

    def step_size(self, sde, t, alpha):
        raise NotImplementedError

    def correct(self, score, sde, t, alpha, x, key, projection=None):
        def body(j, x):
            z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
            s = score(t, x)
            eps = 2 * alpha * (self.snr * jnp.linalg.norm(z) / jnp.linalg.norm(s)) ** 2
            return x + eps * s + jnp.sqrt(2 * eps) * z

        return jax.lax.fori_loop(0, self.steps, body, x)


def test_langevin_step_size_preserves_the_mixture(mixture2d, exact):
    """Started from exact samples of p_t, 100 corrector steps keep p_t (2-d mixture, VE).

    The same chain with per-sample norms (Algorithm 4 taken literally) inflates the spread,
    which shows the check discriminates.
    """
    sde = pf.VESDE()
    t = 0.45  # std(t) ~ 0.7, comparable to the modes' spread
    scale, std = sde.marginal(t)
    score = mixture2d.score_model(sde)
    means, covs = mixture2d.marginal_components(sde, t)
    p_t = pf.GaussianMixture(mixture2d.weights, means, covs)
    x = p_t.sample(jax.random.key(3), N)
    ref = np.asarray(p_t.sample(jax.random.key(4), N))
    cov = np.cov(ref.T)
    ours = _langevin_chain(pf.LangevinCorrector(snr=0.3, steps=100), score, sde, t, x,
                           jax.random.key(5))
    moved = np.mean(np.sum((np.asarray(ours) - np.asarray(x)) ** 2, axis=1))
    assert moved > 0.5 * np.trace(cov)  # the chain mixes, it does not stand still
    np.testing.assert_allclose(np.cov(np.asarray(ours).T), cov, atol=0.1 * np.max(cov))
    _, floor = exact
    sw = float(pf.sliced_wasserstein(ours, ref, key=SW_KEY, num_projections=SW_PROJ))
    assert sw <= 2.5 * floor
    naive = _langevin_chain(_PerSampleNormCorrector(0.3, 100), score, sde, t, x,
                            jax.random.key(5))
    assert np.trace(np.cov(np.asarray(naive).T)) > 1.3 * np.trace(cov)


# --------------------------------------------------------------------------- keys


def test_same_key_same_samples_and_independent_batch(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    # The configuration of test_samplers_match_mixture[pc-rd-langevin-vp]: compiled once.
    run = lambda k: pf.sample_pc(model, sde, N, (2,), key=k, steps=STEPS)
    a = run(jax.random.key(7))
    cache = _sample_pc._cached._cache_size()
    b = run(jax.random.key(7))
    assert _sample_pc._cached._cache_size() == cache  # the second call did not retrace
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    c = run(jax.random.key(8))
    assert not np.allclose(np.asarray(a.x), np.asarray(c.x))
    x = np.asarray(a.x)
    assert len(np.unique(x[:, 0])) == x.shape[0]  # every sample differs
    # Independence: the correlation between the two halves (and between neighbours) is at the
    # sampling-noise level, 1/sqrt(1500) ~ 0.026.
    h = N // 2
    for dim in range(2):
        assert abs(np.corrcoef(x[:h, dim], x[h:, dim])[0, 1]) < 0.1
        assert abs(np.corrcoef(x[:-1:2, dim], x[1::2, dim])[0, 1]) < 0.1


def test_sample_sde_same_key_same_samples(mixture2d):
    sde = pf.VESDE()
    model = mixture2d.score_model(sde)
    a = pf.sample_sde(model, sde, 64, (2,), key=jax.random.key(0), steps=20)
    b = pf.sample_sde(model, sde, 64, (2,), key=jax.random.key(0), steps=20)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert len(np.unique(np.asarray(a.x)[:, 0])) == 64


# --------------------------------------------------------------------------- NFE


@pytest.mark.parametrize(
    "predictor,corrector,denoise,expected",
    [
        (pf.ReverseDiffusionPredictor(), pf.LangevinCorrector(snr=0.16, steps=2), True,
         7 * 3 + 1),
        (pf.AncestralSamplingPredictor(), None, False, 7),
    ],
    ids=["rd-langevin2-denoise", "ancestral-none"],
)
def test_pc_nfe_host_counter(mixture2d, predictor, corrector, denoise, expected):
    sde = pf.VPSDE()
    model = Counting(mixture2d.score_model(sde))
    count, r = host_count(lambda: pf.sample_pc(
        model, sde, 1, (2,), key=jax.random.key(0), steps=7, predictor=predictor,
        corrector=corrector, denoise=denoise))
    assert count == expected
    assert int(r.nfe[0]) == expected
    assert int(r.num_steps[0]) == 7


def test_pc1000_nfe(mixture2d):
    sde = pf.VESDE()
    r = pf.sample_pc(mixture2d.score_model(sde), sde, 2, (2,), key=jax.random.key(0),
                     steps=1000)
    np.testing.assert_array_equal(np.asarray(r.nfe), [2001, 2001])


SDE_SOLVERS = [
    (diffrax.Euler(), 6),
    (diffrax.SRA1(), 6),
    (diffrax.Heun(), None),
]


@pytest.mark.parametrize("solver,steps", SDE_SOLVERS, ids=lambda v: getattr(
    type(v), "__name__", str(v)))
def test_sample_sde_nfe_host_counter(mixture2d, solver, steps):
    sde = pf.VPSDE()
    model = Counting(mixture2d.score_model(sde))
    count, r = host_count(lambda: pf.sample_sde(
        model, sde, 1, (2,), key=jax.random.key(0), solver=solver, steps=steps,
        rtol=1e-2, atol=1e-2))
    assert count == int(r.nfe[0])
    if steps is not None:
        assert int(r.num_steps[0]) == steps
    else:
        assert int(r.num_steps[0]) > 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver,steps",
    [(diffrax.EulerHeun(), 5), (diffrax.ReversibleHeun(), 5), (diffrax.ShARK(), 5),
     (diffrax.SEA(), 5), (diffrax.SPaRK(), 5), (diffrax.GeneralShARK(), 5),
     (diffrax.SlowRK(), 5), (diffrax.Midpoint(), 5), (diffrax.ItoMilstein(), 5),
     (diffrax.ShARK(), None), (diffrax.SPaRK(), None), (diffrax.ReversibleHeun(), None)],
    ids=lambda v: getattr(type(v), "__name__", str(v)),
)
def test_sample_sde_nfe_host_counter_all_solvers(mixture2d, solver, steps):
    test_sample_sde_nfe_host_counter(mixture2d, solver, steps)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("levy_area", [diffrax.BrownianIncrement, diffrax.SpaceTimeLevyArea,
                                       diffrax.SpaceTimeTimeLevyArea])
def test_unchecked_tree_is_diffraxs_tree(levy_area):
    """The adaptive solve's path is diffrax's virtual Brownian tree, bit for bit, less its host
    callback; outside its range the time is clipped."""
    from probflow._brownian import UncheckedBrownianTree

    shape = jax.ShapeDtypeStruct((3,), jnp.float32)
    tree = diffrax.VirtualBrownianTree(0.0, 0.9, tol=0.9 * 2.0**-12, shape=shape,
                                       key=jax.random.key(5), levy_area=levy_area)
    ours = UncheckedBrownianTree(tree)
    f32 = jnp.float32  # array times: one compilation for all of them
    for t0, t1 in [(0.0, 0.9), (0.013, 0.2), (0.41, 0.77), (0.5, 0.5)]:
        ref = tree.evaluate(f32(t0), f32(t1), use_levy=True)
        got = ours.evaluate(f32(t0), f32(t1), use_levy=True)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for t in [0.0, 0.2, 0.77, 0.9]:
        np.testing.assert_array_equal(np.asarray(tree.evaluate(f32(t))),
                                      np.asarray(ours.evaluate(f32(t))))
    jitted = eqx.filter_jit(lambda p, t: p.evaluate(t, t + 0.1))
    assert "callback" not in jitted.lower(ours, f32(0.3)).as_text()
    assert "callback" in jitted.lower(tree, f32(0.3)).as_text()  # diffrax's own check
    np.testing.assert_array_equal(np.asarray(ours.evaluate(f32(1.5))),
                                  np.asarray(tree.evaluate(f32(0.9))))


def test_bad_inputs(mixture2d):
    sde = pf.VPSDE()
    m = mixture2d.score_model(sde)
    key = jax.random.key(0)
    pc = lambda **kw: pf.sample_pc(m, kw.pop("sde", sde), kw.pop("n", 4), kw.pop("shape", (2,)),
                                   key=key, **kw)
    with pytest.raises(ValueError, match="AncestralSamplingPredictor.*SubVPSDE"):
        sub = pf.SubVPSDE()
        pf.sample_pc(mixture2d.score_model(sub), sub, 4, (2,), key=key,
                     predictor=pf.AncestralSamplingPredictor())
    for snr in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="snr"):
            pf.LangevinCorrector(snr=snr)
        with pytest.raises(ValueError, match="snr"):
            pf.AnnealedLangevinCorrector(snr=snr)
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="steps"):
            pf.LangevinCorrector(steps=bad)
        with pytest.raises(ValueError, match="steps"):
            pc(steps=bad)
        with pytest.raises(ValueError, match="steps"):
            pf.sample_sde(m, sde, 4, (2,), key=key, steps=bad)
    for eps in (0.0, -1e-3, 1.0, 2.0):
        with pytest.raises(ValueError, match="eps"):
            pc(eps=eps)
        with pytest.raises(ValueError, match="eps"):
            pf.sample_sde(m, sde, 4, (2,), key=key, eps=eps)
    for n in (0, -1):
        with pytest.raises(ValueError, match="num_samples"):
            pc(n=n)
        with pytest.raises(ValueError, match="num_samples"):
            pf.sample_sde(m, sde, n, (2,), key=key)
    with pytest.raises(ValueError, match="shape"):
        pc(shape=(0, 2))
    with pytest.raises(ValueError, match="shape"):
        pc(shape=(3,))  # the model expects 2-d examples
    with pytest.raises(ValueError, match="predictor"):
        pc(predictor="reverse_diffusion")
    with pytest.raises(ValueError, match="corrector"):
        pc(corrector="langevin")
    with pytest.raises(ValueError, match="sde"):
        pc(sde="vp")
    with pytest.raises(ValueError, match="solver"):
        pf.sample_sde(m, sde, 4, (2,), key=key, solver=diffrax.Tsit5())
    with pytest.raises(ValueError, match="steps=N"):
        pf.sample_sde(m, sde, 4, (2,), key=key, solver=diffrax.Euler(), steps=None)
