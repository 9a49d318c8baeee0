"""pf.TunedSolver / pf.tune_solver / save_solver / load_solver.

The solver is checked against its formula (a float64 numpy recurrence on a mixture's exact
score), against DPM-Solver++(2M) at zero coefficients (mixture and the shipped U-Net), and the
tuned solver on latents it was not tuned on, against an independent tight reference.
"""

import json

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Counting, host_count

import probflow as pf

N = 4
TIMES = (1.0, 0.45, 0.15, 0.03, 1e-3)


@pytest.fixture(scope="module")
def mixture(mixture2d):
    sde = pf.VPSDE()
    return mixture2d.score_model(sde), sde


@pytest.fixture(scope="module")
def tuned(mixture):
    model, sde = mixture
    rms = []
    # Scale corrections (N < 8) and the path matched too: both parts of the loss, one compiled
    # tuner for the default tests.
    solver = pf.tune_solver(model, sde, N, key=jax.random.key(0), shape=(2,), num_latents=32,
                            iterations=15, path_weight=1.0, progress=lambda i, r: rms.append(r))
    return solver, rms


def _rms(x, ref):
    return float(jnp.sqrt(jnp.mean((x - ref) ** 2)))


def _vp_marginal(t, b0=0.1, b1=20.0):
    a = np.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
    return a, np.sqrt(1.0 - a**2)


def _numpy_tuned(model, z, ts, coef, states=None):
    """Eqs. (1)-(2) of probflow/_tuned_solver.py in float64, written from the formula: data
    predictions m = (x + sigma^2 score) / alpha from the exact score, lambda = log(alpha/sigma),
    DPM-Solver++(2M)'s b_i1 = 1 / (2 r_i) except on the first and (N < 15) last step."""
    n = len(ts) - 1
    x = np.asarray(z, np.float64)
    ms, lams = [], []
    for i in range(n):
        a0, s0 = _vp_marginal(ts[i])
        a1, s1 = _vp_marginal(ts[i + 1])
        lam0, lam1 = np.log(a0 / s0), np.log(a1 / s1)
        h = lam1 - lam0
        score = np.asarray(jax.vmap(lambda xi, t=ts[i]: model(jnp.float32(t), xi))(
            jnp.asarray(x, jnp.float32)), np.float64)
        m = (x + s0**2 * score) / a0
        d = (1.0 + coef[i, 0]) * m
        if 1 <= i < n - 1:
            r = (lam0 - lams[-1]) / h
            d = d + 0.5 / r * (m - ms[-1])
        for j in range(1, coef.shape[1]):
            if i >= j:
                d = d + coef[i, j] * (m - ms[-j])
        x = (s1 / s0) * x - a1 * np.expm1(-h) * d
        if states is not None:
            states.append(x)
        ms.append(m)
        lams.append(lam0)
    return x


def test_matches_its_formula_on_a_mixture(mixture):
    model, sde = mixture
    coef = np.asarray(jax.random.normal(jax.random.key(3), (N, 3))) * 0.3
    z = jax.random.normal(jax.random.key(4), (16, 2))
    sched = pf.TunedSchedule(ts=TIMES)
    r = pf.decode(model, sde, z, solver=pf.TunedSolver(coef, sched), steps=N)
    want = _numpy_tuned(model, z, np.asarray(TIMES), coef.astype(np.float64))
    np.testing.assert_allclose(np.asarray(r.x), want, rtol=2e-5, atol=2e-5)
    assert int(r.nfe[0]) == N and int(r.num_steps[0]) == N
    # The coefficients matter: another draw gives another result.
    other = pf.decode(model, sde, z, solver=pf.TunedSolver(coef * 0.5, sched), steps=N)
    assert float(jnp.max(jnp.abs(other.x - r.x))) > 1e-3


def test_zero_coefficients_are_dpm_solver_2m(mixture):
    model, sde = mixture
    z = jax.random.normal(jax.random.key(5), (16, 2))
    for steps in (6,):  # (first and last steps of first order: the formula test, N = 4)
        a = pf.decode(model, sde, z, solver=pf.TunedSolver(jnp.zeros((steps, 3))), steps=steps)
        b = pf.decode(model, sde, z, solver=pf.DPMSolverMultistep(order=2), steps=steps)
        np.testing.assert_allclose(np.asarray(a.x), np.asarray(b.x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def unet():
    model, sde = pf.load_pretrained("digits-vp")
    return Counting(model), model, sde


def test_on_unet_nfe_and_zero_coefficients(unet):
    counting, model, sde = unet
    z = sde.prior_sample(jax.random.key(0), (2, 8, 8, 1), jnp.float32)
    coef = np.asarray(jax.random.normal(jax.random.key(1), (N, 3))) * 0.1
    solver = pf.TunedSolver(coef, pf.TunedSchedule(ts=TIMES))
    count, r = host_count(lambda: pf.decode(counting, sde, z[:1], solver=solver, steps=N))
    assert int(r.nfe[0]) == count == N
    count, e = host_count(lambda: pf.encode(counting, sde, r.x, solver=solver, steps=N))
    assert int(e.nfe[0]) == count == N
    # Zero coefficients: DPM-Solver++(2M), to float32 rounding, on the shipped U-Net.
    a = pf.decode(model, sde, z, solver=pf.TunedSolver(jnp.zeros((5, 3))), steps=5)
    b = pf.decode(model, sde, z, solver=pf.DPMSolverMultistep(order=2), steps=5)
    scale = float(jnp.max(jnp.abs(b.x)))
    assert float(jnp.max(jnp.abs(a.x - b.x))) <= 1e-5 * scale


def test_tuned_solver_beats_2m_on_held_out_latents(mixture, tuned):
    model, sde = mixture
    solver, rms = tuned
    z = jax.random.normal(jax.random.key(99), (256, 2))  # not the calibration latents
    ref = pf.decode(model, sde, z, solver=diffrax.Dopri8(), rtol=1e-8, atol=1e-8).x
    default = _rms(pf.decode(model, sde, z, solver=pf.DPMSolverMultistep(order=2), steps=N).x,
                   ref)
    tuned_err = _rms(pf.decode(model, sde, z, solver=solver, steps=N).x, ref)
    assert tuned_err < 0.7 * default, (tuned_err, default)
    assert len(rms) == 16 and min(rms) < 0.7 * rms[0]
    assert isinstance(solver.schedule, pf.TunedSchedule) and solver.steps == N
    assert solver.coefficients.shape == (N, 3)


def test_tuner_starts_from_2m_end_and_path(mixture, tuned):
    """The first loss the tuner reports is DPM-Solver++(2M)'s on the calibration latents
    (split(key, num_latents) prior draws): the end's mean squared error plus path_weight (1) times
    the states' between the steps, computed here from the formula (float64) against a tight solve
    to the same times."""
    model, sde = mixture
    _, rms = tuned
    z = jax.vmap(lambda k: sde.prior_sample(k, (2,), jnp.float32))(
        jax.random.split(jax.random.key(0), 32))
    ts = np.asarray(pf.DPMSolverMultistep(order=2).schedule.times(sde, 1.0, 1e-3, N,
                                                                  jnp.float32), np.float64)
    states = []
    _numpy_tuned(model, z, ts, np.zeros((N, 3)), states)
    flow = lambda t, y, args: jax.vmap(lambda yi: pf.ProbabilityFlowODE(model, sde)(t, yi, args))(y)
    refs = diffrax.diffeqsolve(
        diffrax.ODETerm(flow), diffrax.Dopri8(), t0=1.0, t1=1e-3, dt0=None, y0=z,
        stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
        saveat=diffrax.SaveAt(ts=jnp.asarray(ts[1:], jnp.float32))).ys
    refs = np.asarray(refs)
    end = np.mean((states[-1] - refs[-1]) ** 2)
    path = np.mean([(a - b) ** 2 for a, b in zip(states[:-1], refs[:-1])])
    assert rms[0] == pytest.approx(np.sqrt(end + path), rel=2e-3)
    assert rms[0] > 1.05 * np.sqrt(end)  # the path's part is there


def test_encode_runs_2m_on_the_times_reversed(mixture, tuned):
    model, sde = mixture
    solver, _ = tuned
    x = jax.random.normal(jax.random.key(7), (8, 2))
    a = pf.encode(model, sde, x, solver=solver, steps=N)
    b = pf.encode(model, sde, x, solver=pf.DPMSolverMultistep(order=2, schedule=solver.schedule),
                  steps=N)
    np.testing.assert_allclose(np.asarray(a.z), np.asarray(b.z), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_damage(tmp_path, mixture, tuned):
    model, sde = mixture
    solver, _ = tuned
    path = tmp_path / "solver.json"
    pf.save_solver(path, solver, info={"note": "test"})
    back = pf.load_solver(path, model=model, sde=sde)
    np.testing.assert_array_equal(np.asarray(back.coefficients), np.asarray(solver.coefficients))
    assert back.schedule == solver.schedule
    z = jax.random.normal(jax.random.key(8), (4, 2))
    np.testing.assert_array_equal(
        np.asarray(pf.decode(model, sde, z, solver=back, steps=N).x),
        np.asarray(pf.decode(model, sde, z, solver=solver, steps=N).x))
    assert json.loads(path.read_text())["info"] == {"note": "test"}
    with pytest.raises(pf.TunedScheduleError, match="tuned for another sde"):
        pf.load_solver(path, sde=pf.SubVPSDE())
    other = pf.GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)]).score_model(sde)
    with pytest.raises(pf.TunedScheduleError, match="tuned for another model"):
        pf.load_solver(path, model=other)
    pf.save_schedule(tmp_path / "s.json", solver.schedule)
    with pytest.raises(pf.TunedScheduleError, match="not a probflow tuned-solver file"):
        pf.load_solver(tmp_path / "s.json")
    text = path.read_text()
    path.write_text(text.replace('"coefficients": [', '"coefficients": [[0.5, 0.5, 0.5], ', 1))
    with pytest.raises(pf.TunedScheduleError, match="corrupted"):
        pf.load_solver(path)
    with pytest.raises(pf.TunedScheduleError, match="no such tuned-solver file"):
        pf.load_solver(tmp_path / "missing.json")


def test_bad_input_one_line(mixture, tuned):
    model, sde = mixture
    solver, _ = tuned
    x = jax.random.normal(jax.random.key(9), (2, 2))
    with pytest.raises(ValueError, match="coefficients must be an"):
        pf.TunedSolver(jnp.zeros(4))
    with pytest.raises(ValueError, match="coefficients must be floating"):
        pf.TunedSolver(jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="^steps=5 does not match this TunedSolver, tuned for "
                       "steps=4$"):
        pf.decode(model, sde, x, solver=solver, steps=5)
    with pytest.raises(ValueError, match="^steps=5 does not match this TunedSchedule, tuned for "
                       "steps=4$"):
        pf.decode(model, sde, x, solver=pf.DPMSolverMultistep(), steps=5,
                  schedule=solver.schedule)
    with pytest.raises(ValueError, match="not the likelihood ODE"):
        pf.log_likelihood(model, sde, x, key=jax.random.key(0), solver=solver, steps=N,
                          eps=1e-3)
    with pytest.raises(ValueError, match="history must be"):
        pf.tune_solver(model, sde, N, key=jax.random.key(0), shape=(2,), history=0)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        pf.tune_solver(model, sde, 1, key=jax.random.key(0), shape=(2,))
    with pytest.raises(ValueError, match="^scale_corrections must be True, False or None"):
        pf.tune_solver(model, sde, N, key=jax.random.key(0), shape=(2,), scale_corrections=1)
    with pytest.raises(ValueError, match="^path_weight must be a finite float >= 0"):
        pf.tune_solver(model, sde, N, key=jax.random.key(0), shape=(2,), path_weight=-1.0)
    with pytest.raises(ValueError, match="solver must be a TunedSolver"):
        pf.save_solver("x.json", pf.DPMSolverMultistep())


def test_without_scale_corrections_g_stays_zero(mixture, tuned):
    """scale_corrections=False (the default from 8 steps on) keeps g exactly zero; the rest is
    tuned (the same compiled tuner as the fixture's)."""
    model, sde = mixture
    solver = pf.tune_solver(model, sde, N, key=jax.random.key(0), shape=(2,), num_latents=32,
                            iterations=3, path_weight=1.0, scale_corrections=False)
    assert np.all(np.asarray(solver.coefficients[:, 0]) == 0.0)
    assert np.any(np.asarray(solver.coefficients[:, 1:]) != 0.0)
    assert np.any(np.asarray(tuned[0].coefficients[:, 0]) != 0.0)


@pytest.mark.slow
def test_defaults_from_8_steps_beat_2m_on_held_out_latents(mixture):
    """From 8 steps on the defaults are no scale corrections and the path matched."""
    model, sde = mixture
    solver = pf.tune_solver(model, sde, 8, key=jax.random.key(1), shape=(2,), num_latents=16,
                            iterations=10)
    assert np.all(np.asarray(solver.coefficients[:, 0]) == 0.0)
    held = jax.random.normal(jax.random.key(98), (256, 2))
    ref = pf.decode(model, sde, held, solver=diffrax.Dopri8(), rtol=1e-8, atol=1e-8).x
    default = _rms(pf.decode(model, sde, held, solver=pf.DPMSolverMultistep(order=2),
                             steps=8).x, ref)
    tuned_err = _rms(pf.decode(model, sde, held, solver=solver, steps=8).x, ref)
    assert tuned_err < 0.8 * default, (tuned_err, default)


@pytest.mark.slow
def test_tune_solver_on_digits_vp():
    """On the shipped U-Net, a short tuning already beats DPM-Solver++(2M) on other latents
    (the full measurement: benchmarks/fewstep.py, docs/samplers.md)."""
    model, sde = pf.load_pretrained("digits-vp")
    solver = pf.tune_solver(model, sde, 5, key=jax.random.key(7), num_latents=32, iterations=15)
    z = jax.vmap(lambda k: sde.prior_sample(k, model.shape))(
        jax.random.split(jax.random.key(123), 32))
    ref = pf.decode(model, sde, z, solver=diffrax.Tsit5(), rtol=1e-6, atol=1e-6).x
    base = _rms(pf.decode(model, sde, z, solver=pf.DPMSolverMultistep(order=2), steps=5).x, ref)
    err = _rms(pf.decode(model, sde, z, solver=solver, steps=5).x, ref)
    assert err < 0.95 * base, (err, base)


@pytest.mark.slow  # nfe_curve's sweeps are tested in test_curves.py; this adds the wiring
def test_nfe_curve_with_a_tuned_solver(mixture, tuned):
    """A tuned solver is one sweep of its own step count in pf.nfe_curve (eps as tuned)."""
    model, sde = mixture
    solver, _ = tuned
    sweeps = [pf.ODESweep(label="2m", solver=pf.DPMSolverMultistep(order=2), steps=(N,)),
              pf.ODESweep(label="tuned", solver=solver, steps=(N,))]
    rows = pf.nfe_curve(model, sde, (2,), key=jax.random.key(3), num_samples=128, eps=1e-3,
                        ode_sweeps=sweeps, stochastic_sweeps=[],
                        reference_solver=diffrax.Dopri8(), reference_tol=1e-8)
    err = {r["sampler"]: r["solver_error"] for r in rows}
    assert err["ode-tuned"] < 0.8 * err["ode-2m"], err
    assert all(r["nfe_mean"] == N for r in rows[1:])


def _cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "probflow", *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=900)


def test_cli_solver_file_for_another_model_is_one_line(tmp_path, tuned):
    solver, _ = tuned  # tuned for the mixture, not for the command's digits-vp
    path = tmp_path / "mixture-solver.json"
    pf.save_solver(path, solver)
    proc = _cli("nfe-curve", "--solvers", "dpm++2m", "--step-counts", "4", "--sde-steps", "",
                "--likelihood-images", "0", "--solver-file", str(path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--solver-file" in proc.stderr and "tuned for another model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_nfe_curve_with_a_solver_file(tmp_path):
    from probflow._tune import fingerprint

    model, sde = pf.load_pretrained("digits-vp")
    sched = pf.TunedSchedule(ts=TIMES, model=fingerprint(model), sde=repr(sde))
    path = tmp_path / "digits-tuned.json"
    pf.save_solver(path, pf.TunedSolver(jnp.zeros((N, 3)), sched))
    out = tmp_path / "curve.png"
    proc = _cli("nfe-curve", "--solvers", "dpm++2m", "--step-counts", "4", "--sde-steps", "",
                "--likelihood-images", "0", "--num-samples", "8", "--solver-file", str(path),
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ode-digits-tuned" in proc.stdout
