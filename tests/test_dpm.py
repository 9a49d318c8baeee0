"""Exponential integrators (DPM-Solver, DPM-Solver++) and log-SNR time, against closed forms,
float64 tight-tolerance re-solves and a host-side evaluation counter."""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Counting, host_count

import probflow as pf
from probflow._dpm import schedule_times

MIXTURE = dict(
    weights=[0.3, 0.7],
    means=[[-1.0, 0.5], [1.5, -0.5]],
    covs=[np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]],
)


def _slope(errs, ns):
    return math.log(errs[0] / errs[1]) / math.log(ns[1] / ns[0])


@pytest.fixture(scope="module")
def mixture_reference():
    """The 2-d mixture in float64 and a Dopri8 decode at rtol = atol = 1e-12 from fixed latents."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        gm = pf.GaussianMixture(**MIXTURE)
        sde = pf.VPSDE()
        model = gm.score_model(sde)
        z = jax.random.normal(jax.random.key(0), (4, 2), jnp.float64)
        ref = pf.decode(model, sde, z, solver=diffrax.Dopri8(), rtol=1e-12, atol=1e-12).x
        yield model, sde, z, ref
    finally:
        jax.config.update("jax_enable_x64", old)


ORDERS = [
    (pf.DPMSolver(order=1, schedule="log_snr"), (20, 40), 1.0),
    (pf.DPMSolver(order=2, schedule="log_snr"), (20, 40), 2.0),
    (pf.DPMSolver(order=3, schedule="log_snr"), (20, 40), 3.0),
    (pf.DPMSolverMultistep(order=2, schedule="log_snr"), (20, 40), 2.0),
    (pf.DPMSolverMultistep(order=3, schedule="log_snr"), (20, 40), 3.0),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
    "solver,ns,order", ORDERS, ids=[f"{type(s).__name__}-{s.solver_order}" for s, _, _ in ORDERS]
)
def test_order_of_convergence_on_mixture(mixture_reference, solver, ns, order):
    model, sde, z, ref = mixture_reference
    errs = [
        float(jnp.abs(pf.decode(model, sde, z, solver=solver, steps=n).x - ref).max()) for n in ns
    ]
    assert abs(_slope(errs, ns) - order) < 0.45, errs


def _gaussian_flow(sde, c, t_from, t_to):
    """Data N(0, c^2 I): x(t) / sqrt(v(t)) is constant along the ODE, v = scale^2 c^2 + std^2."""

    def v(t):
        scale, std = sde.marginal(t)
        return scale**2 * c**2 + std**2

    return float(jnp.sqrt(v(t_to) / v(t_from)))


@pytest.mark.usefixtures("x64")
def test_closed_form_single_gaussian(sde):
    """Decode (T -> eps) and encode (eps -> T) converge to the closed-form flow at their order."""
    c, eps = 0.5, 1e-3
    gm = pf.GaussianMixture([1.0], [[0.0, 0.0, 0.0]], (c**2 * np.eye(3))[None])
    model = gm.score_model(sde)
    z = sde.prior_std() * jax.random.normal(jax.random.key(1), (3, 3), jnp.float64)
    x_true = z * _gaussian_flow(sde, c, sde.T, eps)
    errs = [
        float(
            jnp.abs(
                pf.decode(model, sde, z, eps=eps, solver=pf.DPMSolver(3, "log_snr"), steps=n).x
                - x_true
            ).max()
        )
        for n in (10, 20)
    ]
    scale = float(jnp.abs(x_true).max())
    assert errs[1] < 2e-3 * scale, errs
    assert 2.4 < _slope(errs, (10, 20)) < 3.8, errs

    if isinstance(sde, pf.VESDE):  # encoding runs the same formulas the other way (h < 0)
        x = c * jax.random.normal(jax.random.key(2), (3, 3), jnp.float64)
        z_true = x * _gaussian_flow(sde, c, eps, sde.T)
        z = pf.encode(model, sde, x, eps=eps, solver=pf.DPMSolverMultistep(3), steps=40).z
        assert float(jnp.abs(z - z_true).max()) < 3e-3 * float(jnp.abs(z_true).max())


COUNTED = [
    (pf.DPMSolver(1), 7, "t", ("likelihood",)),
    (pf.DPMSolver(2), None, "t", ("encode",)),
    (pf.DPMSolver(3), 4, "log_snr", ("decode",)),
    (pf.DPMSolver(3), None, "log_snr", ("likelihood",)),
    (pf.DPMSolverMultistep(2), 5, "t", ("sample",)),
    (pf.DPMSolverMultistep(3), 6, "log_snr", ("likelihood",)),
    (diffrax.Tsit5(), None, "log_snr", ("decode",)),
]


@pytest.mark.parametrize(
    "solver,steps,time,runs",
    COUNTED,
    ids=[f"{type(s).__name__}-{n}-{t}" for s, n, t, _ in COUNTED],
)
def test_nfe_matches_host_counter(solver, steps, time, runs):
    gm = pf.GaussianMixture(**MIXTURE)
    sde = pf.VPSDE()
    model = Counting(gm.score_model(sde))
    x = gm.sample(jax.random.key(0), 1)
    opts = dict(solver=solver, steps=steps, time=time, rtol=1e-4, atol=1e-4)
    run = dict(
        decode=lambda: pf.decode(model, sde, x, **opts),
        encode=lambda: pf.encode(model, sde, x, **opts),
        likelihood=lambda: pf.log_likelihood(model, sde, x, key=jax.random.key(1), **opts),
        sample=lambda: pf.sample_ode(model, sde, 1, (2,), key=jax.random.key(2), **opts),
    )
    for name in runs:
        count, r = host_count(run[name])
        assert int(r.nfe[0]) == count, name
        if steps is not None:
            assert int(r.num_steps[0]) == steps
            k = solver.solver_order if isinstance(solver, pf.DPMSolver) else 1
            assert int(r.nfe[0]) == k * steps


def test_round_trip(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(5), 8)
    opts = dict(solver=pf.DPMSolverMultistep(3), steps=40)
    z = pf.encode(model, sde, x, **opts).z
    back = pf.decode(model, sde, z, **opts).x
    rel = jnp.linalg.norm(back - x, axis=1) / jnp.linalg.norm(x, axis=1)
    assert float(rel.max()) < 3e-3


def test_log_snr_time_and_adaptive(mixture2d):
    """Tsit5 (adaptive) and Heun (fixed steps, uniform in lambda) in lambda-time decode correctly;
    so does the adaptive DPM-Solver-23."""
    sde = pf.SubVPSDE()
    model = mixture2d.score_model(sde)
    z = jax.random.normal(jax.random.key(0), (6, 2))
    ref = pf.decode(model, sde, z, rtol=1e-6, atol=1e-6).x
    r = pf.decode(model, sde, z, time="log_snr")
    np.testing.assert_allclose(r.x, ref, atol=3e-4)
    r = pf.decode(model, sde, z, time="log_snr", solver=diffrax.Heun(), steps=100)
    np.testing.assert_allclose(r.x, ref, atol=1e-2)
    r = pf.decode(model, sde, z, time="log_snr", solver=pf.DPMSolver(3), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.x, ref, atol=2e-3)
    assert np.all(np.asarray(r.nfe) < 200)


def _closed_form_check(gm, sde, x, r):
    """log p_eps(x) = log p_T(z) + int div: swap the prior for the mixture's exact p_T."""
    est = r.logp - jax.vmap(sde.prior_logp)(r.z) + gm.log_prob(r.z, sde, sde.T)
    return est, gm.log_prob(x, sde, 1e-5)


LIKELIHOOD = [
    (pf.VPSDE(), dict(time="log_snr")),
    (pf.SubVPSDE(), dict(solver=pf.DPMSolver(3, "log_snr"), steps=40)),
    (pf.VESDE(), dict(solver=pf.DPMSolverMultistep(3), steps=80)),
]


@pytest.mark.parametrize(
    "sde,opts", LIKELIHOOD, ids=["vp-tsit5-log_snr", "subvp-dpm3", "ve-dpm++3m"]
)
def test_likelihood_matches_closed_form(mixture2d, sde, opts):
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 8)
    r = pf.log_likelihood(model, sde, x, trace="exact", **opts)
    est, ref = _closed_form_check(mixture2d, sde, x, r)
    np.testing.assert_allclose(est, ref, atol=1e-2)


def test_schedules():
    sde = pf.VPSDE()
    for name in ("log_snr", "time", "quadratic"):
        for t0, t1 in ((1.0, 1e-3), (1e-3, 1.0)):
            ts = np.asarray(schedule_times(name, sde, t0, t1, 10, jnp.float32))
            assert ts.shape == (11,) and ts[0] == np.float32(t0) and ts[-1] == np.float32(t1)
            assert np.all(np.diff(ts) * np.sign(t1 - t0) > 0)
    lam = np.asarray(sde.log_snr(schedule_times("log_snr", sde, 1.0, 1e-3, 10, jnp.float32)))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam).mean(), rtol=1e-3)


def test_bad_input(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 2)
    for bad in (0, 4, 2.5, True):
        with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
            pf.DPMSolver(order=bad)
    for bad in (1, 4):
        with pytest.raises(ValueError, match="order must be 2 or 3"):
            pf.DPMSolverMultistep(order=bad)
    with pytest.raises(ValueError, match="schedule must be one of"):
        pf.DPMSolver(2, schedule="cosine")
    for solver in (pf.DPMSolver(1), pf.DPMSolverMultistep(2)):
        with pytest.raises(ValueError, match="steps=None"):
            pf.decode(model, sde, x, solver=solver)
    with pytest.raises(ValueError, match="time must be one of"):
        pf.encode(model, sde, x, time="lambda")
    with pytest.raises(ValueError, match="time must be one of"):
        pf.log_likelihood(model, sde, x, trace="exact", time="snr")
    with pytest.raises(ValueError, match="must be bound to an SDE"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(pf.ProbabilityFlowODE(model, sde)),
            pf.DPMSolver(2),
            1.0,
            0.1,
            -0.1,
            x[0],
        )
