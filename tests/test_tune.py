"""pf.tune_schedule / pf.TunedSchedule / save_schedule / load_schedule.

The tuned schedule is judged on latents it was not tuned on, against an independent tight
reference (Dopri8 at 1e-8 on the mixture's exact score; Tsit5 at 1e-6 on the shipped U-Net).
"""

import json

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf

N = 4


@pytest.fixture(scope="module")
def mixture(mixture2d):
    sde = pf.VPSDE()
    return mixture2d.score_model(sde), sde


@pytest.fixture(scope="module")
def tuned(mixture):
    model, sde = mixture
    rms = []
    sched = pf.tune_schedule(
        model, sde, pf.DPMSolverMultistep(order=2), N, key=jax.random.key(0), shape=(2,),
        num_latents=32, iterations=15, progress=lambda i, r: rms.append(r),
    )
    return sched, rms


def _rms(x, ref):
    return float(jnp.sqrt(jnp.mean((x - ref) ** 2)))


def _mean_rms(x, ref):
    """The tuner's objective: the mean over examples of each example's RMS error."""
    return float(jnp.mean(jnp.sqrt(jnp.mean((x - ref).reshape(len(x), -1) ** 2, axis=1))))


def test_tuned_schedule_beats_default_on_held_out_latents(mixture, tuned):
    model, sde = mixture
    sched, _ = tuned
    solver = pf.DPMSolverMultistep(order=2)
    z = jax.random.normal(jax.random.key(99), (256, 2))  # not the calibration latents
    ref = pf.decode(model, sde, z, solver=diffrax.Dopri8(), rtol=1e-8, atol=1e-8).x
    default = _rms(pf.decode(model, sde, z, solver=solver, steps=N).x, ref)
    tuned_err = _rms(pf.decode(model, sde, z, solver=solver, steps=N, schedule=sched).x, ref)
    # Measured: 0.171 -> 0.126 (40 iterations, 64 latents); 15 iterations on 32 get most of it.
    assert tuned_err < 0.85 * default, (tuned_err, default)
    # The tuned schedule is a plain step schedule: other fixed-step solvers take it too.
    heun = pf.decode(model, sde, z, solver=diffrax.Heun(), steps=N, schedule=sched)
    assert bool(jnp.all(jnp.isfinite(heun.x)))
    assert int(heun.nfe[0]) == 2 * N


def test_tuner_objective_is_the_solve(mixture, tuned):
    """The tuner's first reported error is that of pf.decode with the default schedule on the
    calibration latents (split(key, num_latents) prior draws), against Tsit5 at 1e-5: its
    one-diffeqsolve-per-step scan carries the multistep history exactly."""
    model, sde = mixture
    _, rms = tuned
    keys = jax.random.split(jax.random.key(0), 32)
    z = jax.vmap(lambda k: sde.prior_sample(k, (2,), jnp.float32))(keys)
    ref = pf.decode(model, sde, z, solver=diffrax.Tsit5(), rtol=1e-5, atol=1e-5).x
    x = pf.decode(model, sde, z, solver=pf.DPMSolverMultistep(order=2), steps=N).x
    assert rms[0] == pytest.approx(_mean_rms(x, ref), rel=1e-4)
    assert len(rms) == 16 and min(rms) < 0.9 * rms[0]


def test_tuned_schedule_times_and_validation(tuned):
    sched, _ = tuned
    sde = pf.VPSDE()
    assert isinstance(sched, pf.AbstractStepSchedule) and sched.steps == N
    ts = np.asarray(sched.times(sde, 1.0, 1e-3, N, jnp.float32))
    assert ts[0] == 1.0 and ts[-1] == np.float32(1e-3) and np.all(np.diff(ts) < 0)
    back = np.asarray(sched.times(sde, 1e-3, 1.0, N, jnp.float32))  # encode: reversed
    np.testing.assert_array_equal(back, ts[::-1])
    with pytest.raises(ValueError, match="steps=5 does not match"):
        sched.times(sde, 1.0, 1e-3, 5, jnp.float32)
    with pytest.raises(ValueError, match="pass eps=0.001"):
        sched.times(sde, 1.0, 1e-2, N, jnp.float32)
    for bad in ((1.0,), (1.0, 0.5, 0.6, 1e-3), (1.0, 0.5, 0.0), (1.0, float("nan"), 1e-3)):
        with pytest.raises(ValueError, match="times must"):
            pf.TunedSchedule(ts=bad)


def test_save_load_round_trip(tmp_path, mixture, tuned):
    model, sde = mixture
    sched, _ = tuned
    path = tmp_path / "sched.json"
    pf.save_schedule(path, sched, info={"note": "test"})
    back = pf.load_schedule(path, model=model, sde=sde, solver=pf.DPMSolverMultistep(order=2))
    np.testing.assert_allclose(back.ts, sched.ts, rtol=1e-15)
    assert (back.model, back.sde, back.solver, back.time) == (
        sched.model, sched.sde, sched.solver, sched.time)
    assert json.loads(path.read_text())["info"] == {"note": "test"}
    with pytest.raises(pf.TunedScheduleError, match="tuned for another sde"):
        pf.load_schedule(path, sde=pf.SubVPSDE())
    with pytest.raises(pf.TunedScheduleError, match="tuned for another solver"):
        pf.load_schedule(path, solver=pf.DPMSolverMultistep(order=3))
    other = pf.GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)]).score_model(sde)
    with pytest.raises(pf.TunedScheduleError, match="tuned for another model"):
        pf.load_schedule(path, model=other)


@pytest.mark.parametrize("damage", ["digit", "truncate", "json", "missing"])
def test_damaged_schedule_file_raises_one_line(tmp_path, tuned, damage):
    sched, _ = tuned
    path = tmp_path / "sched.json"
    pf.save_schedule(path, sched)
    text = path.read_text()
    if damage == "digit":  # one changed digit in a time
        i = text.index('"times"') + 20
        j = next(k for k in range(i, len(text)) if text[k] in "123456789")
        path.write_text(text[:j] + str(int(text[j]) % 9 + 1) + text[j + 1:])
    elif damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "json":
        path.write_text(json.dumps({"format": "something else"}))
    else:
        path.unlink()
    with pytest.raises(pf.TunedScheduleError) as e:
        pf.load_schedule(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=1), "steps must be at least 2"),
        (dict(steps=0), "steps"),
        (dict(num_latents=0), "num_latents"),
        (dict(iterations=0), "iterations"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(eps=2.0), "eps"),
        (dict(shape=None), "shape must be given"),
        (dict(solver="dpm++2m"), "solver must be a diffrax solver"),
        (dict(reference_tol=0.0), "reference_tol"),
        (dict(init="nonsense"), "schedule"),
    ],
)
def test_invalid_arguments_raise_one_line(mixture, kwargs, match):
    model, sde = mixture
    args = dict(steps=N, shape=(2,), solver=pf.DPMSolverMultistep(order=2))
    args.update(kwargs)
    solver = args.pop("solver")
    with pytest.raises(ValueError, match=match) as e:
        pf.tune_schedule(model, sde, solver, key=jax.random.key(0), **args)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_tuned_schedule_on_digits_vp():
    """The shipped U-Net: DPM-Solver++(3M) with 5 steps, tuned on 16 latents, evaluated on 16
    others against Tsit5 at 1e-6 (measured on 64: 0.080 -> 0.045; docs/samplers.md)."""
    model, sde = pf.load_pretrained("digits-vp")
    solver = pf.DPMSolverMultistep(order=3)
    sched = pf.tune_schedule(model, sde, solver, 5, key=jax.random.key(1), num_latents=16,
                             iterations=10)
    keys = jax.random.split(jax.random.key(2), 16)
    z = jax.vmap(lambda k: sde.prior_sample(k, model.shape, jnp.float32))(keys)
    ref = pf.decode(model, sde, z, solver=diffrax.Tsit5(), rtol=1e-6, atol=1e-6).x
    default = _rms(pf.decode(model, sde, z, solver=solver, steps=5).x, ref)
    tuned_err = _rms(pf.decode(model, sde, z, solver=solver, steps=5, schedule=sched).x, ref)
    assert tuned_err < 0.9 * default, (tuned_err, default)
    assert sched.model == pf._tune.fingerprint(model)


# ------------------------------------------------------------------ NFE curves and the CLI


def test_nfe_curve_with_tuned_schedules(mixture, tuned):
    model, sde = mixture
    sched, _ = tuned
    solver = pf.DPMSolverMultistep(order=2)
    sweeps = [pf.ODESweep(label="2m", solver=solver, steps=(N,)),
              pf.ODESweep(label="2m+tuned", solver=solver, steps=(N,), schedule=(sched,)),
              pf.ODESweep(label="2m+edm", solver=solver, steps=(N,), schedule="edm")]
    rows = pf.nfe_curve(model, sde, (2,), key=jax.random.key(3), num_samples=128,
                        ode_sweeps=sweeps, stochastic_sweeps=[],
                        reference_solver=diffrax.Dopri8(), reference_tol=1e-8)
    err = {r["sampler"]: r["solver_error"] for r in rows}
    assert err["ode-2m+tuned"] < err["ode-2m"] and err["ode-2m+edm"] != err["ode-2m"]
    assert all(r["nfe_mean"] == N for r in rows[1:])


def test_ode_sweep_schedule_validation(tuned):
    sched, _ = tuned
    solver = pf.DPMSolverMultistep(order=2)
    with pytest.raises(ValueError, match="needs steps"):
        pf.ODESweep(label="x", solver=diffrax.Tsit5(), tolerances=(1e-3,), schedule="edm")
    with pytest.raises(ValueError, match="one schedule per step count"):
        pf.ODESweep(label="x", solver=solver, steps=(4, 8), schedule=(sched,))
    assert pf.ODESweep(label="x", solver=solver, steps=(4,), schedule="edm").schedule_for(0) == (
        pf.EDMSchedule())


def test_tune_sweep(mixture):
    model, sde = mixture
    sweep = pf.ODESweep(label="2m", solver=pf.DPMSolverMultistep(order=2), steps=(N,))
    t = pf.tune_sweep(model, sde, sweep, key=jax.random.key(5), shape=(2,), num_latents=8,
                      iterations=1)
    assert t.label == "2m+tuned" and t.steps == (N,)
    assert isinstance(t.schedule, tuple) and isinstance(t.schedule[0], pf.TunedSchedule)
    with pytest.raises(ValueError, match="no step counts"):
        pf.tune_sweep(model, sde, pf.ODESweep(label="t", solver=diffrax.Tsit5(),
                                              tolerances=(1e-3,)), key=jax.random.key(0))


def _cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "probflow", *args], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=900)


def test_cli_bad_schedule_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = _cli("nfe-curve", "--solvers", "dpm++2m", "--step-counts", "4", "--sde-steps", "",
                "--likelihood-images", "0", "--schedule-file", str(bad))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--schedule-file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_nfe_curve_tune_and_schedule_file(tmp_path):
    """`probflow nfe-curve --tune --schedule-file` on a tiny untrained MLP (the plumbing)."""
    sde = pf.VPSDE()
    model = pf.models.MLP((8, 8, 1), sde=sde, width=32, depth=1, key=jax.random.key(0))
    ckpt = tmp_path / "tiny.eqx"
    pf.save_checkpoint(ckpt, model, sde, None, num_bins=17, data_range=(0.0, 1.0), data="digits")
    sched = pf.tune_schedule(model, sde, pf.DPMSolverMultistep(order=2), 3,
                             key=jax.random.key(0), num_latents=4, iterations=2)
    pf.save_schedule(tmp_path / "mine.json", sched)
    js = tmp_path / "c.json"
    proc = _cli("nfe-curve", "--checkpoint", str(ckpt), "--solvers", "dpm++2m,euler",
                "--step-counts", "3", "--sde-steps", "", "--likelihood-images", "0",
                "--num-samples", "8", "--tune", "--schedule-file", str(tmp_path / "mine.json"),
                "--out", str(tmp_path / "c.png"), "--json", str(js))
    assert proc.returncode == 0, proc.stderr[-3000:]
    samplers = {r["sampler"] for r in json.loads(js.read_text())["rows"]}
    assert {"ode-dpm++2m", "ode-dpm++2m+tuned", "ode-euler+tuned", "ode-dpm++2m+mine",
            "ode-euler+mine"} <= samplers
