"""Failures of compiled solves: one-line errors raised in Python, at the first non-finite step,
and no host callback inside any compiled solve (so JAX's persistent cache can store them)."""

import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Counting, count, reset_count

import probflow as pf
from probflow import _controllable, _edm, _elbo, _flow, _likelihood, _reverse_sde
from probflow._dequantization import TruncatedNormalDequantization, UniformDequantization
from probflow._divergence import make_trace_estimator

N = 3
MESSAGE = re.compile(r"at t=([-0-9.e+]+) in (\d+) of (\d+) examples")


class NaNScore(eqx.Module):
    """A score model that returns NaN everywhere (a checkpoint with NaN weights)."""

    def __call__(self, t, x):
        return jnp.full_like(x, jnp.nan)


class ExplodingScore(eqx.Module):
    """The mixture's score above t = 0.5, inf below (a model that overflows part-way)."""

    model: eqx.Module

    def __call__(self, t, x):
        return jnp.where(t < 0.5, jnp.inf, self.model(t, x)).astype(x.dtype)


class StiffScore(eqx.Module):
    """s(t, x) = sign * 1e13 * x: finite, but so stiff that no explicit step can be taken
    (the step size collapses below the resolution of t)."""

    sign: float

    def __call__(self, t, x):
        return (self.sign * 1e13 * x).astype(x.dtype)


def _check(exc_info, count=N):
    """One line, naming t and the count (of `count` examples); returns t."""
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    m = MESSAGE.search(msg)
    assert m is not None, msg
    assert int(m.group(2)) == count and int(m.group(3)) == count, msg
    return float(m.group(1))


KEY = jax.random.key(0)
X = jnp.array([[0.1, 0.2], [-1.0, 0.5], [1.5, -0.3]])


def _samplers():
    """Every sampler, run on a 2-d model for N examples (decode-direction: T down to eps)."""
    z = jax.random.normal(KEY, (N, 2))
    mask = jnp.array([1.0, 0.0])
    gray_shape = (N, 1, 2, 1)

    def colorize(m):
        # The colour model sees [1, 2, 3] images; the 2-d score acts on pairs of values.
        flat = lambda t, y: jax.vmap(lambda r: m(t, r))(y.reshape(-1, 2)).reshape(y.shape)
        return pf.colorize(flat, pf.VPSDE(), jnp.full(gray_shape, 0.3), key=KEY, steps=50)

    classifier = lambda t, x: jnp.stack([x[0], -x[0]])
    return {
        "decode-adaptive": lambda m: pf.decode(m, pf.VPSDE(), z, rtol=1e-3, atol=1e-3),
        "decode-heun": lambda m: pf.decode(m, pf.VPSDE(), z, solver=diffrax.Heun(), steps=50),
        "sample_ode-dpm": lambda m: pf.sample_ode(m, pf.VPSDE(), N, (2,), key=KEY,
                                                  solver=pf.DPMSolverMultistep(order=2),
                                                  steps=50),
        "sample_sde-euler": lambda m: pf.sample_sde(m, pf.VPSDE(), N, (2,), key=KEY, steps=100),
        "sample_sde-shark": lambda m: pf.sample_sde(m, pf.VPSDE(), N, (2,), key=KEY,
                                                    solver=diffrax.ShARK(), steps=50),
        "sample_sde-adaptive": lambda m: pf.sample_sde(m, pf.VPSDE(), N, (2,), key=KEY,
                                                       solver=diffrax.Heun(), steps=None),
        "sample_pc": lambda m: pf.sample_pc(m, pf.VPSDE(), N, (2,), key=KEY, steps=100),
        "inpaint": lambda m: pf.inpaint(m, pf.VPSDE(), X, mask, key=KEY, steps=100),
        "inpaint-smc": lambda m: pf.inpaint(m, pf.VPSDE(), X, mask, key=KEY, steps=100,
                                            predictor=pf.ReverseDiffusionPredictor(),
                                            corrector=None, num_particles=4),
        "colorize": colorize,
        "sample_conditional": lambda m: pf.sample_conditional(
            m, classifier, pf.VPSDE(), jnp.array([0, 1, 0]), (2,), key=KEY, steps=100),
    }


SAMPLERS = _samplers()
# How many evaluations (of the whole batch) a NaN model may cost before the error: adaptive
# solves evaluate twice for the first step size and once per stage of the first attempt;
# fixed-step samplers stop after their first step (the sequential Monte Carlo sampler, a scan,
# runs to the end but reports the first bad step).
# Predictor-corrector: predictor and corrector at the first step, then Tweedie's denoising.
MAX_EVALUATIONS = {"decode-adaptive": 2 + 7, "decode-heun": 2, "sample_ode-dpm": 2,
                   "sample_sde-euler": 1, "sample_sde-shark": 2, "sample_sde-adaptive": 2,
                   "inpaint-smc": 101}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_nan_model_fails_at_once_with_one_line(name):
    reset_count()
    with pytest.raises(pf.SolveError) as e:
        jax.block_until_ready(SAMPLERS[name](Counting(NaNScore())))
    # The first evaluation is non-finite: every sampler stops at its first step (t = T), having
    # evaluated the model only for that step, not for max_steps or every step.
    t = _check(e)
    assert t == pytest.approx(1.0, abs=1e-6), str(e.value)
    assert "max_steps" not in str(e.value)
    assert count() <= MAX_EVALUATIONS.get(name, 3), (name, count())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_exploding_model_names_where_it_failed(name, mixture2d):
    model = ExplodingScore(pf.MixtureScore(mixture2d, pf.VPSDE()))
    with pytest.raises(pf.SolveError) as e:
        SAMPLERS[name](model)
    t = _check(e)
    # The start of the first step that evaluated the model below t = 0.5 (predictor-corrector
    # steps evaluate at both ends, the SMC scan at its start); adaptive steps may be long.
    assert 0.45 <= t <= (0.9999 if "adaptive" in name else 0.6), str(e.value)


def test_forward_solves_name_their_first_time(mixture2d):
    # encode and the likelihood run from eps up to T: the model's inf below t = 0.5 is met at
    # the first step.
    model = ExplodingScore(pf.MixtureScore(mixture2d, pf.VPSDE()))
    with pytest.raises(pf.SolveError, match="ODE solve") as e:
        pf.encode(model, pf.VPSDE(), X, rtol=1e-3, atol=1e-3)
    assert _check(e) == pytest.approx(1e-3)
    for slots in (None, 2):
        with pytest.raises(pf.SolveError) as e:
            pf.log_likelihood(model, pf.VPSDE(), X, key=KEY, slots=slots, rtol=1e-3, atol=1e-3)
        assert _check(e) == pytest.approx(1e-5)


@pytest.mark.parametrize("slots", [None, 2])
def test_nan_likelihood_fails_fast(slots):
    reset_count()
    with pytest.raises(pf.SolveError) as e:
        pf.log_likelihood(Counting(NaNScore()), pf.VPSDE(), X[:1], key=KEY, slots=slots)
    assert _check(e, count=1) == pytest.approx(1e-5)
    # 2 for the first step size, then one attempt of Tsit5 (6 stages, and F(t0, y0) again in
    # the lockstep solve), never max_steps rejected attempts.
    assert count() <= 2 + 7


@pytest.mark.parametrize("slots", [None, 2])
def test_collapsing_step_size_stops_with_its_own_error(slots):
    # s = +1e13 x makes the forward (likelihood) solve stiff beyond any explicit step, and
    # s = -1e13 x the backward one.
    with pytest.raises(pf.SolveError, match="step size collapsed") as e:
        pf.log_likelihood(StiffScore(1.0), pf.VPSDE(), X, key=KEY, slots=slots)
    _check(e)
    assert "max_steps" not in str(e.value)
    with pytest.raises(pf.SolveError, match="step size collapsed") as e:
        pf.decode(StiffScore(-1.0), pf.VPSDE(), X)
    _check(e)


def test_max_steps_names_the_limit(mixture2d):
    model = pf.MixtureScore(mixture2d, pf.VPSDE())
    with pytest.raises(pf.SolveError, match=r"reached max_steps=3 .*raise max_steps") as e:
        pf.encode(model, pf.VPSDE(), X, max_steps=3)
    t = _check(e)
    assert 1e-3 < t < 1.0


def test_bad_input_values_are_value_errors(mixture2d):
    model = pf.MixtureScore(mixture2d, pf.VPSDE())
    bad = X.at[1, 0].set(jnp.nan)
    for fn in (
        lambda: pf.encode(model, pf.VPSDE(), bad),
        lambda: pf.log_likelihood(model, pf.VPSDE(), bad, key=KEY),
        lambda: pf.log_likelihood(model, pf.VPSDE(), bad, key=KEY, slots=2),
        lambda: pf.inpaint(model, pf.VPSDE(), bad, jnp.array([1.0, 0.0]), key=KEY, steps=5),
    ):
        with pytest.raises(ValueError, match=r"^x contains NaN or inf values in 1 of 3 "
                                             r"examples; pass finite data$"):
            fn()
    with pytest.raises(ValueError, match=r"^z contains NaN or inf values in 1 of 3"):
        pf.decode(model, pf.VPSDE(), bad)
    with pytest.raises(ValueError, match=r"x_int must hold integers in \[0, num_bins=4\): 1 of "
                                         r"2 examples"):
        pf.bits_per_dim(model, pf.VPSDE(), jnp.array([[0, 3], [1, 4]]), key=KEY, num_bins=4)


@pytest.mark.slow  # compiles the U-Net's likelihood solve
def test_nan_weights_unet_fails_fast():
    model, sde = pf.load_pretrained("digits-vp")
    model = jax.tree_util.tree_map(
        lambda a: jnp.full_like(a, jnp.nan) if eqx.is_inexact_array(a) else a, model)
    x = pf.data.load("digits", "test").images[:2]
    with pytest.raises(pf.SolveError, match="non-finite values") as e:
        pf.bits_per_dim(model, sde, x, key=KEY, num_bins=17)
    msg = str(e.value)
    assert "\n" not in msg and "in 2 of 2 examples" in msg and "max_steps" not in msg


# ------------------------------------------------------------------ no host callback in a solve


def _has_callback(fn, *args) -> bool:
    return "callback" in fn.lower(*args).as_text()


def _ode(solver, steps, **kw):
    """A resolved plan as the public functions build it (rtol = atol = 1e-3, max_steps=100)."""
    return pf.ODEOptions(solver=solver, rtol=1e-3, atol=1e-3, steps=steps, max_steps=100,
                         **kw).for_examples(2)


def test_no_host_callback_in_any_compiled_solve(mixture2d):
    sde = pf.VPSDE()
    model = pf.MixtureScore(mixture2d, sde)
    x = jnp.zeros((N, 2))
    keys = jax.random.split(KEY, N)
    est = make_trace_estimator("rademacher", 1, None)
    programs = {}
    for name, opts in {
        "adaptive": _ode(diffrax.Tsit5(), None),
        "fixed": _ode(diffrax.Heun(), 10),
        "dpm": _ode(pf.DPMSolver(order=2), None),
        "dpm-fixed": _ode(pf.DPMSolverMultistep(order=2), 10),
        "refill": _ode(diffrax.Tsit5(), None, scheduler=pf.Refill(2)),
    }.items():
        programs[f"encode-{name}"] = (_flow._encode, model, sde, x, 1e-3, opts)
        programs[f"decode-{name}"] = (_flow._decode, model, sde, x, 1e-3, opts)
        programs[f"likelihood-{name}"] = (_likelihood._log_likelihood, model, sde, x, keys,
                                          1e-5, opts, est, "jvp")
    for name, deq in {"uniform": UniformDequantization(),
                      "truncated-normal": TruncatedNormalDequantization()}.items():
        programs[f"dequantize-{name}"] = (_likelihood._dequantize, jnp.zeros((N, 2), jnp.int32),
                                          KEY, 256, 0.0, 1.0, deq, jnp.float32, sde, 1e-5, False)
        programs[f"dequantize-{name}-per-example"] = (
            _likelihood._dequantize, jnp.zeros((N, 2), jnp.int32), keys, 256, 0.0, 1.0, deq,
            jnp.float32, sde, 1e-5, True)
    programs["elbo"] = (_elbo._elbo, model, sde, x, keys, _elbo.VariationalBound(8, 2), 1e-5)
    for name, solver in {"euler": diffrax.Euler(), "shark": diffrax.ShARK()}.items():
        so = pf.SDEOptions(solver=solver, steps=10, max_steps=100)
        programs[f"sde-{name}"] = (_reverse_sde._sample_sde, model, sde, keys, (2,), jnp.float32,
                                   1e-3, so)
    pc = (pf.ReverseDiffusionPredictor(), pf.LangevinCorrector())
    programs["pc"] = (_reverse_sde._sample_pc, model, sde, keys, (2,), jnp.float32, 1e-3, 10,
                      *pc, True)
    programs["edm"] = (_edm._sample_edm, model, sde, keys, (2,), jnp.float32, 1e-3, 5,
                       pf.EDMStochasticSampler(S_churn=1.0), pf.EDMSchedule())
    mask = jnp.ones((N, 2)).at[:, 1].set(0)
    programs["inpaint"] = (_controllable._inpaint, model, sde, x, mask, keys, 1e-3, 10, *pc, True)
    programs["inpaint-smc"] = (_controllable._inpaint_smc, model, sde, x, mask, keys, 1e-3, 10, 4,
                               True)
    # Adaptive: a virtual Brownian tree (`_brownian.UncheckedBrownianTree`), with Levy area too.
    for name, solver in {"adaptive": diffrax.Heun(), "adaptive-shark": diffrax.ShARK()}.items():
        so = pf.SDEOptions(solver=solver, steps=None, max_steps=100)
        programs[f"sde-{name}"] = (_reverse_sde._sample_sde, model, sde, keys, (2,), jnp.float32,
                                   1e-3, so)
    with_callback = [name for name, (fn, *args) in programs.items() if _has_callback(fn, *args)]
    assert with_callback == []
    # The check itself can fail: diffrax's own tree checks its range with a host callback.
    tree = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=KEY)
    assert _has_callback(eqx.filter_jit(lambda t: tree.evaluate(t, t + 0.1)), jnp.float32(0.2))


def test_solve_error_is_exported():
    assert issubclass(pf.SolveError, RuntimeError)
    assert np.isfinite(float(pf.decode(pf.MixtureScore(
        pf.GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)]), pf.VPSDE()), pf.VPSDE(),
        X, rtol=1e-3, atol=1e-3).x.sum()))
