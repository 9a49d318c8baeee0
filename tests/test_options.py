"""The solve plans (`pf.ODEOptions`, `pf.SDEOptions`): `options=` gives the same results as the
equivalent keywords, bit for bit (the same computation twice in one process), for every solve
function; bad plans raise one-line ValueErrors naming the field; the presets are the documented
settings; the solver traits are those of the solvers' tableaus."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._options import BPD_TOL, MAX_STEPS

KEY = jax.random.key(0)


def _same(a, b):
    for name in ("x", "z", "logp", "logp_probes", "bpd", "bpd_probes", "nfe", "num_steps"):
        if hasattr(a, name):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)),
                                          np.asarray(getattr(b, name)), err_msg=name)


@pytest.fixture(scope="module")
def problem(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = np.asarray(mixture2d.sample(jax.random.key(1), 6))
    return sde, model, x


ODE_SETTINGS = [
    dict(solver=diffrax.Heun(), steps=10),
    dict(solver=diffrax.Dopri5(), rtol=1e-4, atol=1e-4, time=pf.LinearTime()),
    dict(solver=pf.DPMSolverMultistep(order=2), steps=8, schedule="log_snr"),
    dict(solver=diffrax.Bosh3(), rtol=1e-3, atol=1e-3, time="sqrt_t", max_steps=500),
]


@pytest.mark.parametrize("kw", ODE_SETTINGS, ids=["heun10", "dopri5", "dpm++2m", "bosh3"])
def test_ode_options_equal_keywords_bit_for_bit(problem, kw):
    sde, model, x = problem
    opts = pf.ODEOptions(**kw)
    _same(pf.encode(model, sde, x, options=opts), pf.encode(model, sde, x, **kw))
    z = np.asarray(pf.encode(model, sde, x, **kw).z)
    _same(pf.decode(model, sde, z, options=opts), pf.decode(model, sde, z, **kw))
    _same(pf.sample_ode(model, sde, 4, (2,), key=KEY, options=opts),
          pf.sample_ode(model, sde, 4, (2,), key=KEY, **kw))
    _same(pf.log_likelihood(model, sde, x, key=KEY, options=opts),
          pf.log_likelihood(model, sde, x, key=KEY, **kw))


def test_likelihood_schedulers_as_options_and_keywords(problem):
    sde, model, x = problem
    kw = dict(solver=diffrax.Tsit5(), rtol=1e-4, atol=1e-4)
    refill = pf.log_likelihood(model, sde, x, key=KEY, slots=3, **kw)
    _same(refill, pf.log_likelihood(model, sde, x, key=KEY,
                                    options=pf.ODEOptions(scheduler=pf.Refill(3), **kw)))
    lock = pf.log_likelihood(model, sde, x, key=KEY, **kw)
    # Refilled or lockstep: the same per-example solves (to float rounding), never more cost.
    np.testing.assert_allclose(np.asarray(refill.logp), np.asarray(lock.logp), rtol=1e-5)
    assert np.all(np.asarray(refill.nfe) <= np.asarray(lock.nfe))


def test_encode_and_decode_refilled(problem):
    """The refill scheduler is generic: encode and decode solve a batch in slots, each example's
    result that of its own solve (to float rounding), at no more evaluations than lockstep."""
    sde, model, x = problem
    lock = pf.ODEOptions(solver=diffrax.Dopri5(), rtol=1e-4, atol=1e-4)
    refill = lock.replace(scheduler=pf.Refill(2))
    for fn, data in ((pf.encode, x), (pf.decode, np.asarray(pf.encode(model, sde, x).z))):
        a, b = fn(model, sde, data, options=lock), fn(model, sde, data, options=refill)
        out = "z" if fn is pf.encode else "x"
        np.testing.assert_allclose(np.asarray(getattr(b, out)), np.asarray(getattr(a, out)),
                                   rtol=1e-5, atol=1e-5)
        # FSAL: the refilled solve reuses F(t0, y0) of the step-size selection, one fewer.
        np.testing.assert_array_equal(np.asarray(b.nfe), np.asarray(a.nfe) - 1)
        np.testing.assert_array_equal(np.asarray(b.num_steps), np.asarray(a.num_steps))


def test_bits_per_dim_options_equal_keywords_and_the_preset(problem):
    sde, model, _ = problem
    x_int = np.random.default_rng(0).integers(0, 32, size=(5, 2))
    common = dict(key=KEY, num_bins=32, data_range=(-3.0, 3.0))
    default = pf.bits_per_dim(model, sde, x_int, **common)
    _same(default, pf.bits_per_dim(model, sde, x_int, options=pf.ODEOptions.bits_per_dim(sde),
                                   **common))
    # The preset spelled out: Dopri5 at 3e-4 in sqrt(t) (VP), refill with the automatic slots.
    spelled = pf.ODEOptions(solver=diffrax.Dopri5(), rtol=3e-4, atol=3e-4, time="sqrt_t",
                            scheduler=pf.Refill())
    _same(default, pf.bits_per_dim(model, sde, x_int, options=spelled, **common))
    # Keywords start from the preset (here: sqrt(t) time for VP); options= is the whole plan.
    heun = dict(solver=diffrax.Heun(), steps=12)
    _same(pf.bits_per_dim(model, sde, x_int, slots=None, **heun, **common),
          pf.bits_per_dim(model, sde, x_int,
                          options=pf.ODEOptions.bits_per_dim(sde, **heun), **common))
    _same(pf.bits_per_dim(model, sde, x_int, time="t", **heun, **common),
          pf.bits_per_dim(model, sde, x_int, options=pf.ODEOptions(**heun), **common))
    paper = pf.bits_per_dim(model, sde, x_int, options=pf.ODEOptions.paper(), **common)
    _same(paper, pf.bits_per_dim(model, sde, x_int, solver=diffrax.Dopri5(), rtol=1e-5,
                                 atol=1e-5, time="t", slots="lockstep", **common))


@pytest.mark.slow  # about 20 s on 2 idle cores (two U-Net compilations)
def test_unet_options_equal_keywords_bit_for_bit():
    """The shipped digits-vp U-Net: decode and bits/dim with options= and with keywords."""
    model, sde = pf.load_pretrained("digits-vp")
    ds = pf.data.load("digits", split="test")
    x_int = np.asarray(ds.images[:3])
    kw = dict(solver=diffrax.Heun(), steps=4)
    common = dict(key=KEY, num_bins=ds.num_bins)
    _same(pf.bits_per_dim(model, sde, x_int, **kw, **common),
          pf.bits_per_dim(model, sde, x_int, options=pf.ODEOptions.bits_per_dim(sde, **kw),
                          **common))
    z = np.asarray(jax.random.normal(KEY, (2,) + x_int.shape[1:]))
    _same(pf.decode(model, sde, z, **kw), pf.decode(model, sde, z, options=pf.ODEOptions(**kw)))


def test_sde_options_equal_keywords_bit_for_bit(problem, mixture2d):
    sde, model, x = problem
    for kw in (dict(solver=diffrax.Euler(), steps=20),
               dict(solver=diffrax.Heun(), steps=None, rtol=1e-2, atol=1e-2)):
        _same(pf.sample_sde(model, sde, 4, (2,), key=KEY, options=pf.SDEOptions(**kw)),
              pf.sample_sde(model, sde, 4, (2,), key=KEY, **kw))
    kw = dict(predictor=pf.EulerMaruyamaPredictor(), corrector=None, steps=15, denoise=False)
    opts = pf.SDEOptions(**kw)
    _same(pf.sample_pc(model, sde, 4, (2,), key=KEY, options=opts),
          pf.sample_pc(model, sde, 4, (2,), key=KEY, **kw))
    mask = np.array([1.0, 0.0])
    _same(pf.inpaint(model, sde, x, mask, key=KEY, options=opts),
          pf.inpaint(model, sde, x, mask, key=KEY, **kw))
    classifier = mixture2d.classifier(sde)
    labels = jnp.array([0, 1, 1])
    _same(pf.sample_conditional(model, classifier, sde, labels, (2,), key=KEY, options=opts),
          pf.sample_conditional(model, classifier, sde, labels, (2,), key=KEY, **kw))
    # colorize: a standard normal's score on [H, W, 3] images.
    gray = np.random.default_rng(0).normal(size=(2, 2, 2, 1)).astype(np.float32)
    normal = lambda t, y: -y
    _same(pf.colorize(normal, sde, gray, key=KEY, options=opts),
          pf.colorize(normal, sde, gray, key=KEY, **kw))
    # The defaults: an SDEOptions() is what the keywords left out give.
    _same(pf.sample_pc(model, sde, 2, (2,), key=KEY, steps=5),
          pf.sample_pc(model, sde, 2, (2,), key=KEY, options=pf.SDEOptions(steps=5)))


def test_options_and_keywords_together_raise(problem):
    sde, model, x = problem
    opts = pf.ODEOptions(solver=diffrax.Heun(), steps=10)
    with pytest.raises(ValueError, match=r"either as options= or as keywords.*rtol="):
        pf.encode(model, sde, x, options=opts, rtol=1e-3)
    with pytest.raises(ValueError, match="slots="):
        pf.log_likelihood(model, sde, x, key=KEY, options=opts, slots=4)
    with pytest.raises(ValueError, match="options must be a pf.ODEOptions"):
        pf.decode(model, sde, x, options=pf.SDEOptions())
    with pytest.raises(ValueError, match="corrector="):
        pf.sample_pc(model, sde, 2, (2,), key=KEY, options=pf.SDEOptions(), corrector=None)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(solver=diffrax.Kvaerno5()), "solver"),
        (dict(solver="dopri5"), "solver"),
        (dict(rtol=-1.0), "rtol"),
        (dict(atol=float("nan")), "atol"),
        (dict(rtol=np.ones(2)), "rtol"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(max_steps=0), "max_steps"),
        (dict(steps=100, max_steps=10), "max_steps"),
        (dict(time="lambda"), "time"),
        (dict(solver=pf.DPMSolver(2), time="sqrt_t"), "time"),
        (dict(solver=diffrax.Euler()), "steps=None"),
        (dict(schedule="edm"), "schedule"),
        (dict(steps=5, schedule="cosine"), "schedule"),
        (dict(scheduler="auto"), "scheduler"),
        (dict(solver=diffrax.ReversibleHeun(), scheduler=pf.Refill()), "slots"),
        (dict(solver=pf.DPMSolver(2), time="log_snr", scheduler=pf.Refill()), "slots"),
    ],
)
def test_bad_ode_options_raise_one_line_naming_the_field(kw, field):
    with pytest.raises(ValueError) as info:
        pf.ODEOptions(**kw)
    message = str(info.value)
    assert "\n" not in message and field in message


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(solver=diffrax.Tsit5()), "solver"),
        (dict(solver=diffrax.Euler(), steps=None), "steps"),
        (dict(steps=-1), "steps"),
        (dict(rtol=0.0), "rtol"),
        (dict(predictor=pf.LangevinCorrector()), "predictor"),
        (dict(corrector=pf.ReverseDiffusionPredictor()), "corrector"),
        (dict(denoise="yes"), "denoise"),
    ],
)
def test_bad_sde_options_raise_one_line_naming_the_field(kw, field):
    with pytest.raises(ValueError) as info:
        pf.SDEOptions(**kw)
    assert "\n" not in str(info.value) and field in str(info.value)
    with pytest.raises(ValueError, match="slots"):
        pf.Refill(0)


def test_presets_and_defaults():
    plain = pf.ODEOptions()
    assert isinstance(plain.solver, diffrax.Tsit5) and plain.adaptive
    assert float(plain.rtol) == float(plain.atol) == pytest.approx(1e-5)
    assert plain.max_steps == MAX_STEPS == 16384
    assert plain.time == pf.LinearTime() and plain.scheduler == pf.Lockstep()
    paper = pf.ODEOptions.paper()
    assert isinstance(paper.solver, diffrax.Dopri5) and paper.time == pf.LinearTime()
    assert float(paper.rtol) == pytest.approx(1e-5) and paper.scheduler == pf.Lockstep()
    for sde, time in ((pf.VPSDE(), pf.SqrtTime()), (pf.SubVPSDE(), pf.LinearTime()),
                      (pf.VESDE(), pf.LinearTime())):
        bpd = pf.ODEOptions.bits_per_dim(sde)
        assert isinstance(bpd.solver, diffrax.Dopri5) and bpd.time == time
        assert float(bpd.rtol) == pytest.approx(BPD_TOL) and bpd.scheduler == pf.Refill()
    # The exponential integrators do not run in sqrt(t): the preset falls back to t.
    assert pf.ODEOptions.bits_per_dim(pf.VPSDE(), solver=pf.DPMSolver(2)).time == pf.LinearTime()
    # Fixed steps run in lockstep; the default schedule is laid once, in the plan.
    fixed = pf.ODEOptions.bits_per_dim(pf.VPSDE(), solver=diffrax.Heun(), steps=10)
    assert fixed.scheduler == pf.Lockstep()
    assert fixed.schedule == pf.UniformSchedule(pf.SqrtTime())
    assert pf.ODEOptions(solver=pf.DPMSolver(2, schedule="log_snr"), steps=5).schedule == (
        pf.UniformSchedule(pf.LogSNRTime()))
    assert pf.ODEOptions(steps=5, time="log_snr").schedule == pf.UniformSchedule(pf.LogSNRTime())
    # "auto" slots are resolved at the edge from the example size (64 on CPU for 2-d).
    assert pf.ODEOptions(scheduler=pf.Refill()).for_examples(2).scheduler == pf.Refill(64)
    sde_plan = pf.SDEOptions()
    assert isinstance(sde_plan.solver, diffrax.Euler) and sde_plan.steps == 1000
    assert sde_plan.corrector == pf.LangevinCorrector(snr=0.16, steps=1) and sde_plan.denoise


def test_solver_traits_follow_the_tableaus():
    traits = lambda s: pf.ODEOptions(solver=s, steps=4).traits
    dopri5 = traits(diffrax.Dopri5())
    # Dormand--Prince 5(4): 7 stages, first same as last, error order 5.
    assert dopri5.costs == (0, 7, 6) and dopri5.fsal and dopri5.adaptive
    assert dopri5.explicit_rk and dopri5.error_order == 5 and dopri5.refillable
    heun = traits(diffrax.Heun())
    assert heun.costs == (0, 2, 2) and not heun.fsal and heun.adaptive
    euler = traits(diffrax.Euler())
    assert euler.costs == (0, 1, 1) and not euler.adaptive and not euler.refillable
    half = traits(diffrax.HalfSolver(diffrax.Euler()))
    assert half.costs == (0, 3, 3) and half.adaptive and not half.explicit_rk
    dpm = traits(pf.DPMSolver(3))
    assert dpm.costs == (0, 3, 3) and dpm.needs_binding and dpm.adaptive
    assert dpm.clocks == (pf.LinearTime, pf.LogSNRTime) and dpm.refill_clocks == (pf.LinearTime,)
    multistep = traits(pf.DPMSolverMultistep(2))
    assert multistep.costs == (0, 1, 1) and not multistep.adaptive
    assert not multistep.refillable
    assert pf.SDEOptions(solver=diffrax.SRA1(), steps=None).traits.costs == (0, 2, 2)


def test_cli_builds_its_plan_from_the_library_presets():
    import argparse

    from probflow._cli._common import ode_plan

    flags = argparse.Namespace(solver=None, rtol=None, atol=None, ode_steps=None, time=None)
    assert ode_plan(flags) == pf.ODEOptions()
    sde = pf.SubVPSDE()
    bpd = lambda **given: pf.ODEOptions.bits_per_dim(sde, **given)
    assert ode_plan(flags, bpd) == pf.ODEOptions.bits_per_dim(sde)
    assert ode_plan(flags, pf.ODEOptions.sampling) == pf.ODEOptions.sampling()
    set_ = argparse.Namespace(solver="dopri5", rtol=1e-5, atol=1e-5, ode_steps=None, time="t")
    paper = ode_plan(set_, bpd, scheduler=pf.Lockstep())
    assert paper.solver == pf.ODEOptions.paper().solver and paper.time == pf.LinearTime()
    assert paper.scheduler == pf.Lockstep() and float(paper.rtol) == pytest.approx(1e-5)
