"""The few-step solvers (UniPC, iPNDM, tAB-DEIS, EDM's stochastic sampler): against float64
numpy implementations written from the papers' equations, fixtures recorded from the reference
code (scripts/make_fewstep_fixtures.py), orders of convergence against a float64 tight solve, and
`nfe` against a host-side counter on the shipped U-Net."""

from __future__ import annotations

import math
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Counting, host_count
from scipy import integrate

import probflow as pf
from probflow._edm import solve_edm

FIXTURES = Path(__file__).parent / "fixtures"
MIXTURE = dict(
    weights=[0.3, 0.7],
    means=[[-1.0, 0.5], [1.5, -0.5]],
    covs=[np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]],
)
EPS = 1e-3


class RecordedSchedule(pf.AbstractStepSchedule):
    """Given times (a recorded schedule), for solves of exactly len(ts) - 1 steps."""

    ts: tuple[float, ...]

    def times(self, sde, t0, t1, steps, dtype):
        assert steps == len(self.ts) - 1 and self.ts[0] == t0 and self.ts[-1] == t1
        return jnp.asarray(self.ts, dtype)


# --------------------------------------------------------------------------- the mixture in numpy


class NumpyVP:
    """VPSDE(0.1, 20) in float64 numpy: alpha, sigma (std), lambda and its inverse, written out."""

    b0, b1 = 0.1, 20.0

    def big_b(self, t):
        return self.b0 * t + 0.5 * (self.b1 - self.b0) * t**2

    def alpha(self, t):
        return math.exp(-0.5 * self.big_b(t))

    def std(self, t):
        return math.sqrt(-math.expm1(-self.big_b(t)))

    def lam(self, t):
        return math.log(self.alpha(t) / self.std(t))

    def t_of_sigma(self, sig):
        """t with std / alpha = sig: B(t) = log(1 + sig^2), solved for t."""
        b = math.log1p(sig**2)
        d = self.b1 - self.b0
        return (-self.b0 + math.sqrt(self.b0**2 + 2.0 * d * b)) / d


class Exact:
    """The mixture's exact score: eps(x, t) in numpy float64, the numpy VP, and the probflow
    model in float64 (`model`) and float32 (`model32`) under VPSDE()."""

    def __init__(self):
        self.sde = pf.VPSDE()
        self.vp = NumpyVP()
        self.model32 = pf.GaussianMixture(**MIXTURE).score_model(self.sde)
        with jax.enable_x64(True):
            self.model = pf.GaussianMixture(**MIXTURE).score_model(self.sde)
            self._score = jax.jit(lambda t, x, model=self.model: model(t, x))

    def eps(self, x, t):
        with jax.enable_x64(True):
            return -self.vp.std(t) * np.asarray(self._score(jnp.float64(t), jnp.asarray(x)))


@pytest.fixture(scope="module")
def exact():
    return Exact()


def _z(n=4):
    with jax.enable_x64(True):
        return np.asarray(jax.random.normal(jax.random.key(0), (n, 2), jnp.float64))


# --------------------------------------------------------------------------- the papers' equations


def _phi_h(k, h):
    """h phi_{k+1}(h) * ... : the UniPC paper's h phi_k recursion, in float64."""
    g = math.expm1(h) / h - 1.0  # h phi_2(h)
    fact = 1.0
    out = []
    for i in range(1, k + 1):
        out.append(g * fact)
        fact *= i + 1
        g = g / h - 1.0 / fact
    return out


def numpy_unipc(eps, vp, x, ts, order, variant, prediction, lower_order_final=True):
    """UniPC (Zhao et al. 2023), Algorithm 2 with UniP-p / UniC-p (eq. 7-8, B(h) of section 3.3):
    predict, evaluate at the prediction, correct (not at the last step); no re-evaluation."""
    data = prediction == "data"
    n = len(ts) - 1

    def model(x, t):
        e = eps(x, t)
        return (x - vp.std(t) * e) / vp.alpha(t) if data else e

    hist = [(ts[0], model(x, ts[0]))]  # (t, m), newest last
    for s in range(1, n + 1):
        p = min(order, s, n + 1 - s) if lower_order_final else min(order, s)
        t_s, m_s = hist[-1]
        t = ts[s]
        h = vp.lam(t) - vp.lam(t_s)
        hh = -h if data else h
        b_h = hh if variant == "bh1" else math.expm1(hh)
        rks = [(vp.lam(hist[-1 - k][0]) - vp.lam(t_s)) / h for k in range(1, p)]
        d1s = [(hist[-1 - k][1] - m_s) / rks[k - 1] for k in range(1, p)]
        g = _phi_h(p, hh)
        b = np.array([g[i] / b_h for i in range(p)])
        big_r = np.array([[r**i for r in rks + [1.0]] for i in range(p)])
        if data:
            base = vp.std(t) / vp.std(t_s) * x - vp.alpha(t) * math.expm1(hh) * m_s
            coef = vp.alpha(t) * b_h
        else:
            base = vp.alpha(t) / vp.alpha(t_s) * x - vp.std(t) * math.expm1(hh) * m_s
            coef = vp.std(t) * b_h
        if p == 1:
            rho_p = []
        elif p == 2:
            rho_p = [0.5]
        else:
            rho_p = np.linalg.solve(big_r[:-1, :-1], b[:-1])
        x_pred = base - coef * sum((r * d for r, d in zip(rho_p, d1s, strict=True)),
                                   np.zeros_like(x))
        if s == n:
            return x_pred
        m_t = model(x_pred, t)
        rho_c = [0.5] if p == 1 else np.linalg.solve(big_r, b)
        corr = sum((r * d for r, d in zip(rho_c[:-1], d1s, strict=True)), np.zeros_like(x))
        x = base - coef * (corr + rho_c[-1] * (m_t - m_s))
        hist.append((t, m_t))
    return x


_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
       4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def numpy_ipndm(eps, vp, x, ts, order):
    """iPNDM (Zhang & Chen 2023, eq. 26): Adams-Bashforth in sigma on eps, x~ = x / alpha."""
    xt = x / vp.alpha(ts[0])
    es = []
    for i in range(len(ts) - 1):
        es.insert(0, eps(vp.alpha(ts[i]) * xt, ts[i]))
        q = min(order, i + 1)
        sig0 = vp.std(ts[i]) / vp.alpha(ts[i])
        sig1 = vp.std(ts[i + 1]) / vp.alpha(ts[i + 1])
        xt = xt + (sig1 - sig0) * sum(w * e for w, e in zip(_AB[q], es, strict=False))
    return vp.alpha(ts[-1]) * xt


def numpy_deis(eps, vp, x, ts, order):
    """tAB-DEIS (Zhang & Chen 2023, eq. 14-15): eps's Lagrange interpolant in t through the last
    steps, integrated in sigma by scipy's adaptive quadrature with the closed-form t(sigma)."""
    xt = x / vp.alpha(ts[0])
    es, nodes = [], []
    for i in range(len(ts) - 1):
        es.insert(0, eps(vp.alpha(ts[i]) * xt, ts[i]))
        nodes.insert(0, ts[i])
        q = min(order, i + 1)
        sig0 = vp.std(ts[i]) / vp.alpha(ts[i])
        sig1 = vp.std(ts[i + 1]) / vp.alpha(ts[i + 1])
        incr = np.zeros_like(xt)
        for j in range(q):

            def basis(sig, j=j, q=q):
                tau = vp.t_of_sigma(sig)
                return math.prod(
                    (tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(q) if k != j
                )

            c, _ = integrate.quad(basis, sig0, sig1, epsabs=0.0, epsrel=1e-13, limit=200)
            incr = incr + c * es[j]
        xt = xt + incr
    return vp.alpha(ts[-1]) * xt


def numpy_edm(eps, vp, x, ts, noises, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022, Algorithm 2 in x~ = x / alpha, sigma = std / alpha; the Heun
    correction skipped on the last step; sigma^ capped at sigma(T)."""
    n = len(ts) - 1
    sig = [vp.std(t) / vp.alpha(t) for t in ts]
    xt = x / vp.alpha(ts[0])
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sig_hat = min(sig[i] * (1 + gamma), max(sig[0], sig[i]))
        t_hat = vp.t_of_sigma(sig_hat) if sig_hat > sig[i] else ts[i]
        xt_hat = xt + math.sqrt(sig_hat**2 - sig[i] ** 2) * s_noise * noises[i]
        d = eps(vp.alpha(t_hat) * xt_hat, t_hat)
        xt = xt_hat + (sig[i + 1] - sig_hat) * d
        if i < n - 1:
            d2 = eps(vp.alpha(ts[i + 1]) * xt, ts[i + 1])
            xt = xt_hat + (sig[i + 1] - sig_hat) * 0.5 * (d + d2)
    return vp.alpha(ts[-1]) * xt


# --------------------------------------------------------------------------- against the papers

def _quadratic_ts(n):
    """n steps uniform in sqrt(t) from 1 to EPS."""
    return (np.linspace(1.0, math.sqrt(EPS), n + 1) ** 2).tolist()


def _decode64(model, sde, z, solver, ts):
    with jax.enable_x64(True):
        ts = [float(t) for t in ts]
        ts[0], ts[-1] = 1.0, EPS
        r = pf.decode(model, sde, jnp.asarray(z), solver=solver, steps=len(ts) - 1,
                      schedule=RecordedSchedule(tuple(ts)))
        return np.asarray(r.x), np.asarray(r.nfe)


def _decode32(exact, z, solver, ts):
    ts = [float(np.float32(t)) for t in ts]
    ts[0], ts[-1] = 1.0, EPS
    r = pf.decode(exact.model32, exact.sde, jnp.asarray(z, jnp.float32), solver=solver,
                  steps=len(ts) - 1,
                  schedule=RecordedSchedule(tuple(ts)))
    return np.asarray(r.x)


UNIPC_CASES = [(1, "bh1", "data", True), (2, "bh2", "noise", False), (3, "bh1", "data", True),
               (3, "bh2", "noise", True), (3, "bh1", "noise", False)]


@pytest.mark.parametrize("order,variant,prediction,lof", UNIPC_CASES,
                         ids=[f"{o}-{v}-{p}-{'lof' if f else 'full'}" for o, v, p, f in
                              UNIPC_CASES])
def test_unipc_matches_paper(exact, order, variant, prediction, lof):
    eps, vp, model, sde = exact.eps, exact.vp, exact.model, exact.sde
    ts = _quadratic_ts(7)
    z = _z()
    want = np.stack([numpy_unipc(eps, vp, zi, ts, order, variant, prediction, lof) for zi in z])
    solver = pf.UniPC(order, variant=variant, prediction=prediction, lower_order_final=lof)
    got, nfe = _decode64(model, sde, z, solver, ts)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert np.all(nfe == 7)
    got32 = _decode32(exact, z, solver, ts)
    np.testing.assert_allclose(got32, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_and_deis_match_paper(exact, order):
    """Float64 to 1e-9; float32 (order 3) to 2e-5."""
    eps, vp, model, sde = exact.eps, exact.vp, exact.model, exact.sde
    with jax.enable_x64(True):
        ts = np.asarray(pf.EDMSchedule().times(sde, 1.0, EPS, 8, jnp.float64)).tolist()
    z = _z()
    for solver, ref in ((pf.IPNDM(order), numpy_ipndm), (pf.DEIS(order), numpy_deis)):
        want = np.stack([ref(eps, vp, zi, ts, order) for zi in z])
        got, nfe = _decode64(model, sde, z, solver, ts)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=repr(solver))
        assert np.all(nfe == 8)
        if order == 3:
            np.testing.assert_allclose(_decode32(exact, z, solver, ts), want, rtol=2e-5,
                                       atol=2e-5, err_msg=repr(solver))


EDM_CASES = [(0.0, 0.0, math.inf, 1.0), (30.0, 0.05, 50.0, 1.003), (80.0, 0.0, math.inf, 1.0)]


@pytest.mark.parametrize("churn", EDM_CASES, ids=["no-churn", "tmin-tmax", "max-churn"])
def test_edm_matches_paper(exact, churn):
    """sample_edm against Algorithm 2 with the same prior draws and noise (the sampler draws
    step i's noise from the example's chain key folded with i)."""
    eps, vp, model, sde = exact.eps, exact.vp, exact.model, exact.sde
    s_churn, s_tmin, s_tmax, s_noise = churn
    sampler = pf.EDMStochasticSampler(s_churn, s_tmin, s_tmax, s_noise)
    steps, key = 6, jax.random.key(3)
    with jax.enable_x64(True):
        r = pf.sample_edm(model, sde, 3, (2,), key=key, sampler=sampler, steps=steps,
                          dtype=jnp.float64)
        ts = np.asarray(pf.EDMSchedule().times(sde, 1.0, EPS, steps, jnp.float64)).tolist()
        want = []
        for k in jax.random.split(key, 3):
            k_prior, k_chain = jax.random.split(k)
            x_T = np.asarray(sde.prior_sample(k_prior, (2,), jnp.float64))
            noises = [np.asarray(jax.random.normal(jax.random.fold_in(k_chain, i), (2,),
                                                   jnp.float64)) for i in range(steps)]
            want.append(numpy_edm(eps, vp, x_T, ts, noises, s_churn, s_tmin, s_tmax, s_noise))
    # (float64: the diffrax loop and a plain loop of the same steps differ at 1e-8 from the
    # third step on; 1e-7 is still far below float32's 1e-5 here.)
    np.testing.assert_allclose(np.asarray(r.x), np.stack(want), rtol=1e-7, atol=1e-7)
    assert np.all(np.asarray(r.nfe) == 2 * steps - 1)
    assert np.all(np.asarray(r.num_steps) == steps)


# ----------------------------------------------------------------------- against the reference code


def _unipc_fixture_names():
    fx = np.load(FIXTURES / "fewstep_unipc.npz")
    return sorted(k[: -len("_x")] for k in fx.files if k.startswith("unipc_") and k.endswith("_x"))


# Every order, variant, prediction and reference schedule once (the rest: slow).
UNIPC_FAST = ["unipc_1_bh1_data_logSNR", "unipc_1_bh2_noise_time_quadratic",
              "unipc_2_bh1_noise_logSNR", "unipc_2_bh2_data_time_quadratic",
              "unipc_3_bh1_data_time_quadratic", "unipc_3_bh2_noise_logSNR"]
UNIPC_FIXTURES = [n if n in UNIPC_FAST else pytest.param(n, marks=pytest.mark.slow)
                  for n in _unipc_fixture_names()]


@pytest.mark.parametrize("name", UNIPC_FIXTURES)
def test_unipc_matches_reference_code(exact, name):
    """wl-zhao/UniPC's multistep sampler (orders 1-3, B(h) variants, predictions, the reference's
    time_quadratic and logSNR schedules, its default lower_order_final) in float64; float32 for
    UniPC-3."""
    model, sde = exact.model, exact.sde
    fx = np.load(FIXTURES / "fewstep_unipc.npz")
    assert len(_unipc_fixture_names()) == 24
    z = fx["z"]
    _, order, variant, prediction, _ = name.split("_", 4)
    solver = pf.UniPC(int(order), variant=variant, prediction=prediction)
    ts = fx[f"{name}_t"]
    got, nfe = _decode64(model, sde, z, solver, ts)
    np.testing.assert_allclose(got, fx[f"{name}_x"], rtol=1e-9, atol=1e-9)
    assert np.all(nfe == int(fx[f"{name}_nfe"]))
    if order == "3":
        np.testing.assert_allclose(_decode32(exact, z, solver, ts), fx[f"{name}_x"],
                                   rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_and_deis_match_reference_code(exact, order):
    """zju-pi/diff-sampler's ipndm_sampler and deis_sampler (tab) on EDM's rho = 7 schedule."""
    model, sde = exact.model, exact.sde
    fx = np.load(FIXTURES / "fewstep_diff_sampler.npz")
    z, ts = fx["z"], fx["diff_sampler_t"]
    for solver, name in ((pf.IPNDM(order), "ipndm"), (pf.DEIS(order), "deis")):
        want = fx[f"{name}_{order}_x"]
        got, nfe = _decode64(model, sde, z, solver, ts)
        # DEIS: the reference integrates its coefficients by a Riemann sum (Richardson-
        # extrapolated when recorded), good to about 1e-9.
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8, err_msg=name)
        assert np.all(nfe == int(fx[f"{name}_{order}_nfe"]))
        if order == 4:
            # float32: the steps cancel terms of size sigma(T) |eps| ~ 150 |x| at T, so
            # rounding reaches about 150 x 6e-8 ~ 1e-5.
            np.testing.assert_allclose(_decode32(exact, z, solver, ts), want, rtol=5e-5,
                                       atol=5e-5, err_msg=name)


# --------------------------------------------------------------------------- orders of convergence


def _slope(errs, ns):
    return math.log(errs[0] / errs[1]) / math.log(ns[1] / ns[0])


@pytest.fixture(scope="module")
def tight(exact):
    """A float64 Dopri8 decode at rtol = atol = 1e-12 from fixed latents."""
    model, sde = exact.model, exact.sde
    with jax.enable_x64(True):
        z = jnp.asarray(_z())
        ref = pf.decode(model, sde, z, solver=diffrax.Dopri8(), rtol=1e-12, atol=1e-12).x
    return z, ref, None


def _slow(*args):
    return pytest.param(*args, marks=pytest.mark.slow)


ORDERS = [
    _slow(pf.UniPC(1, schedule="log_snr", lower_order_final=False), (20, 40), 2.0, EPS),
    _slow(pf.UniPC(2, schedule="log_snr", lower_order_final=False), (20, 40), 3.0, EPS),
    (pf.UniPC(3, schedule="log_snr", lower_order_final=False), (20, 40), 4.0, EPS),
    (pf.UniPC(2, schedule="log_snr", variant="bh2", prediction="noise",
              lower_order_final=False), (20, 40), 3.0, EPS),
    _slow(pf.DEIS(2, schedule="log_snr"), (40, 80), 2.0, EPS),
    (pf.DEIS(3, schedule="log_snr"), (40, 80), 3.0, EPS),
    _slow(pf.DEIS(4, schedule="log_snr"), (40, 80), 4.0, EPS),
    # iPNDM's constant-step Adams-Bashforth weights on steps that are not uniform in sigma:
    # second order whatever the order (as documented).
    _slow(pf.IPNDM(2, schedule="log_snr"), (40, 80), 2.0, EPS),
    (pf.IPNDM(3, schedule="log_snr"), (40, 80), 2.0, EPS),
    _slow(pf.IPNDM(4, schedule="log_snr"), (40, 80), 2.0, EPS),
]
_ORDER_IDS = ["unipc1", "unipc2", "unipc3", "unipc2-bh2-noise", "deis2", "deis3", "deis4",
              "ipndm2", "ipndm3", "ipndm4"]


@pytest.mark.parametrize("solver,ns,order,eps_end", ORDERS, ids=_ORDER_IDS)
def test_order_of_convergence(exact, tight, solver, ns, order, eps_end):
    model, sde = exact.model, exact.sde
    z, ref, ref_short = tight
    ref = ref if eps_end == EPS else ref_short
    with jax.enable_x64(True):
        errs = [float(jnp.abs(pf.decode(model, sde, z, eps=eps_end, solver=solver,
                                        steps=n).x - ref).max()) for n in ns]
    assert abs(_slope(errs, ns) - order) < 0.5, errs


def test_edm_heun_order_two(exact, tight):
    """Without churn, Algorithm 2 is Heun in sigma (Algorithm 1): second order."""
    model, sde = exact.model, exact.sde
    z, ref, _ = tight
    errs = []
    with jax.enable_x64(True):
        for n in (20, 40):
            s = pf.EDMStochasticSampler().bind(sde, n)
            ts = pf.EDMSchedule().times(sde, 1.0, EPS, n, jnp.float64)
            x = jax.vmap(lambda zi, s=s, ts=ts: solve_edm(model, s, zi, ts,
                                                          jax.random.key(0))[0])(z)
            errs.append(float(jnp.abs(x - ref).max()))
    assert abs(_slope(errs, (20, 40)) - 2.0) < 0.4, errs


def test_edm_churn_samples_the_mixture(mixture2d):
    """With churn and enough steps, the samples' moments are the mixture's."""
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    r = pf.sample_edm(model, sde, 4000, (2,), key=jax.random.key(0), steps=60,
                      sampler=pf.EDMStochasticSampler(S_churn=40.0, S_noise=1.0))
    ref = mixture2d.sample(jax.random.key(1), 20000)
    np.testing.assert_allclose(r.x.mean(0), ref.mean(0), atol=0.06)
    np.testing.assert_allclose(jnp.cov(r.x.T), jnp.cov(ref.T), atol=0.1)


# --------------------------------------------------------------------------- honest nfe


@pytest.fixture(scope="module")
def unet():
    model, sde = pf.load_pretrained("digits-vp")
    return Counting(model), sde


NEW_SOLVERS = [pf.UniPC(3), pf.UniPC(2, variant="bh2", prediction="noise"), pf.IPNDM(),
               pf.DEIS()]


@pytest.mark.parametrize("solver", NEW_SOLVERS, ids=["unipc3", "unipc2-bh2-noise", "ipndm",
                                                     "deis"])
def test_nfe_matches_host_counter_on_unet(unet, solver):
    model, sde = unet
    z = sde.prior_sample(jax.random.key(0), (1, 8, 8, 1), jnp.float32)
    count, r = host_count(lambda: pf.decode(model, sde, z, solver=solver, steps=4))
    assert int(r.nfe[0]) == count == 4
    count, r = host_count(lambda: pf.encode(model, sde, r.x, solver=solver, steps=3,
                                            time="log_snr"))
    assert int(r.nfe[0]) == count == 3


def test_edm_nfe_matches_host_counter_on_unet(unet):
    model, sde = unet
    sampler = pf.EDMStochasticSampler(S_churn=10.0)
    for steps in (1, 4):
        count, r = host_count(lambda steps=steps: pf.sample_edm(
            model, sde, 1, (8, 8, 1), key=jax.random.key(0), sampler=sampler, steps=steps))
        assert int(r.nfe[0]) == count == 2 * steps - 1


def test_mixture_nfe_and_sample_ode(mixture2d):
    sde = pf.VPSDE()
    model = Counting(mixture2d.score_model(sde))
    for solver in NEW_SOLVERS:
        count, r = host_count(lambda solver=solver: pf.sample_ode(
            model, sde, 1, (2,), key=jax.random.key(2), solver=solver, steps=5))
        assert int(r.nfe[0]) == count == 5
        assert int(r.num_steps[0]) == 5


# --------------------------------------------------------------------------- bad input


def test_bad_input(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 2)
    for bad in (0, 4, True):
        with pytest.raises(ValueError, match="order must be 1, 2 or 3 for UniPC"):
            pf.UniPC(order=bad)
    for cls in (pf.IPNDM, pf.DEIS):
        for bad in (0, 5, 2.5):
            with pytest.raises(ValueError, match=f"order must be 1, 2, 3 or 4 for {cls.__name__}"):
                cls(order=bad)
    with pytest.raises(ValueError, match="variant must be 'bh1' or 'bh2'"):
        pf.UniPC(variant="bh3")
    with pytest.raises(ValueError, match="prediction must be 'data' or 'noise'"):
        pf.UniPC(prediction="x0")
    with pytest.raises(ValueError, match="schedule must be one of"):
        pf.DEIS(schedule="cosine")
    for solver in (pf.UniPC(), pf.IPNDM(), pf.DEIS()):
        with pytest.raises(ValueError, match="steps=None"):
            pf.decode(model, sde, x, solver=solver)
        with pytest.raises(ValueError, match="not the likelihood ODE"):
            pf.log_likelihood(model, sde, x, key=jax.random.key(0), solver=solver, steps=4)
        with pytest.raises(ValueError, match="is not supported by solver=.*, which runs in time"):
            pf.decode(model, sde, x, solver=solver, steps=4, time="sqrt_t")
    for kw, match in ((dict(S_churn=-1.0), "S_churn must be"), (dict(S_noise=0.0), "S_noise"),
                      (dict(S_tmin=2.0, S_tmax=1.0), "S_tmin must be <= S_tmax")):
        with pytest.raises(ValueError, match=match):
            pf.EDMStochasticSampler(**kw)
    with pytest.raises(ValueError, match="sampler must be"):
        pf.sample_edm(model, sde, 1, (2,), key=jax.random.key(0), sampler=diffrax.Heun())
    with pytest.raises(ValueError, match="not supported"):
        pf.decode(model, sde, x, solver=pf.EDMStochasticSampler(), steps=4)
