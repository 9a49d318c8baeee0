"""Clocks and step schedules (probflow/_time.py) against closed forms and float64 re-solves."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf

CLOCKS = [pf.LinearTime(), pf.LogSNRTime(), pf.SqrtTime()]
SDES = [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE()]


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("clock", CLOCKS, ids=lambda c: c.name)
def test_clock_round_trip_and_derivative(sde, clock):
    t = jnp.array([1e-3, 0.05, 0.3, 0.7, 1.0])
    c = clock.to_clock(sde, t)
    np.testing.assert_allclose(clock.to_time(sde, c), t, rtol=2e-5)
    # dt/dc against autodiff of t(c).
    dt_dc = jax.vmap(jax.grad(lambda ci: clock.to_time(sde, ci)))(c)
    np.testing.assert_allclose(clock.dt_dc(sde, t), dt_dc, rtol=2e-3)
    assert clock.static_to_clock(sde, 0.3) == pytest.approx(float(c[2]), rel=1e-5)


@pytest.mark.parametrize("clock", CLOCKS, ids=lambda c: c.name)
def test_uniform_schedule_is_uniform_in_its_clock(clock):
    sde = pf.VPSDE()
    for t0, t1 in ((1.0, 1e-3), (1e-3, 1.0)):
        ts = pf.UniformSchedule(clock).times(sde, t0, t1, 10, jnp.float32)
        assert ts.shape == (11,) and ts[0] == np.float32(t0) and ts[-1] == np.float32(t1)
        d = np.diff(np.asarray(clock.to_clock(sde, ts), np.float64))
        np.testing.assert_allclose(d, d.mean(), rtol=2e-3)


def test_edm_schedule_matches_karras_eq5():
    # VE: sigma(t) = std(t) / scale(t) in closed form; Karras et al. 2022 eq. (5), rho = 7.
    sde = pf.VESDE(sigma_min=0.01, sigma_max=50.0)
    t0, t1, n, rho = 1.0, 1e-5, 12, 7.0
    smax, smin = [0.01 * 5000.0**t * np.sqrt(1 - 5000.0 ** (-2 * t)) for t in (t0, t1)]
    i = np.arange(n + 1)
    want = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    ts = pf.EDMSchedule().times(sde, t0, t1, n, jnp.float64 if jax.config.jax_enable_x64
                                else jnp.float32)
    alpha, std = sde.marginal(ts)
    np.testing.assert_allclose(np.asarray(std / alpha), want, rtol=2e-4)
    with pytest.raises(ValueError, match="rho must be a positive number"):
        pf.EDMSchedule(rho=0.0)


def test_strings_are_converted_once_at_the_edge(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    z = jax.random.normal(jax.random.key(0), (4, 2))
    kw = dict(solver=diffrax.Heun(), steps=6)
    for name, clock in zip(("t", "log_snr", "sqrt_t"), CLOCKS):
        a = pf.decode(model, sde, z, time=name, **kw)
        b = pf.decode(model, sde, z, time=clock, **kw)
        np.testing.assert_array_equal(a.x, b.x)
    a = pf.decode(model, sde, z, schedule="edm", **kw)
    b = pf.decode(model, sde, z, schedule=pf.EDMSchedule(), **kw)
    np.testing.assert_array_equal(a.x, b.x)
    # The DPM-Solver names are the same objects: "quadratic" is uniform in sqrt(t).
    assert pf.DPMSolver(2, "quadratic").schedule == pf.UniformSchedule(pf.SqrtTime())
    assert pf.DPMSolver(2, "time").schedule == pf.UniformSchedule(pf.LinearTime())
    with pytest.raises(ValueError, match="schedule must be one of"):
        pf.decode(model, sde, z, schedule="cosine", **kw)
    with pytest.raises(ValueError, match="schedule= lays the steps"):
        pf.decode(model, sde, z, schedule="edm")


@pytest.mark.parametrize(
    "schedule", [pf.UniformSchedule(pf.SqrtTime()), pf.EDMSchedule(), "log_snr"],
    ids=["sqrt", "edm", "log_snr"],
)
@pytest.mark.parametrize("time", ["t", "log_snr"])
def test_schedules_converge_to_the_reference(mixture2d, schedule, time):
    """Every schedule, in every clock, converges to the adaptive Dopri8 solution; nfe exact."""
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    z = jax.random.normal(jax.random.key(1), (16, 2))
    ref = pf.decode(model, sde, z, solver=diffrax.Dopri8(), rtol=1e-7, atol=1e-7).x
    r = pf.decode(model, sde, z, solver=diffrax.Heun(), steps=200, schedule=schedule, time=time)
    np.testing.assert_allclose(r.x, ref, atol=2e-3)
    assert np.all(np.asarray(r.nfe) == 400)


def test_sqrt_schedule_beats_uniform_t_for_heun(mixture2d):
    """The measured effect behind the default (docs/samplers.md): Heun, 10 steps."""
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    z = jax.random.normal(jax.random.key(1), (64, 2))
    ref = pf.decode(model, sde, z, solver=diffrax.Dopri8(), rtol=1e-7, atol=1e-7).x
    err = {}
    for name in ("t", "sqrt_t"):
        x = pf.decode(model, sde, z, solver=diffrax.Heun(), steps=10, schedule=name).x
        err[name] = float(jnp.mean(jnp.linalg.norm(x - ref, axis=1)))
    assert err["sqrt_t"] < 0.5 * err["t"], err
