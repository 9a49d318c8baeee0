"""The SDEs against the closed forms of the paper (section 3.4) and Monte Carlo."""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import probflow as pf
from probflow._sde import AbstractLinearBetaSDE

TIMES = [1e-5, 1e-3, 0.1, 0.37, 0.8, 1.0]


def test_vp_closed_forms():
    sde = pf.VPSDE()
    for t in TIMES:
        big_b = 0.1 * t + 0.5 * 19.9 * t * t
        scale, std = sde.marginal(t)
        np.testing.assert_allclose(scale, math.exp(-big_b / 2), rtol=1e-6)
        np.testing.assert_allclose(std, math.sqrt(1 - math.exp(-big_b)), rtol=1e-5)
        np.testing.assert_allclose(sde.diffusion(t), math.sqrt(0.1 + t * 19.9), rtol=1e-6)
        x = jnp.array([1.0, -2.0])
        np.testing.assert_allclose(sde.drift(t, x), -0.5 * (0.1 + 19.9 * t) * x, rtol=1e-6)


def test_subvp_closed_forms():
    sde = pf.SubVPSDE()
    for t in TIMES:
        big_b = 0.1 * t + 0.5 * 19.9 * t * t
        scale, std = sde.marginal(t)
        np.testing.assert_allclose(scale, math.exp(-big_b / 2), rtol=1e-6)
        np.testing.assert_allclose(std, 1 - math.exp(-big_b), rtol=1e-5)
        g2 = (0.1 + 19.9 * t) * (1 - math.exp(-2 * big_b))
        np.testing.assert_allclose(sde.diffusion(t), math.sqrt(g2), rtol=1e-5)


def test_ve_closed_forms():
    sde = pf.VESDE()
    for t in TIMES:
        sigma = 0.01 * (50 / 0.01) ** t
        scale, std = sde.marginal(t)
        assert float(scale) == 1.0
        np.testing.assert_allclose(std, math.sqrt(sigma**2 - 0.01**2), rtol=1e-4)
        np.testing.assert_allclose(
            sde.diffusion(t), sigma * math.sqrt(2 * math.log(50 / 0.01)), rtol=1e-5
        )
        np.testing.assert_allclose(sde.drift(t, jnp.ones(3)), 0.0)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("sde", [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE()], ids=["vp", "subvp", "ve"])
def test_marginals_solve_the_moment_equations(sde):
    """d scale/dt = f scale and d std^2/dt = 2 f std^2 + g^2: the marginals belong to the SDE."""
    for t in [0.05, 0.3, 0.9]:
        t = jnp.asarray(t, jnp.float64)
        dscale = jax.grad(lambda s: sde.marginal(s)[0])(t)
        dvar = jax.grad(lambda s: sde.marginal(s)[1] ** 2)(t)
        scale, std = sde.marginal(t)
        f, g = sde.drift_coef(t), sde.diffusion(t)
        np.testing.assert_allclose(dscale, f * scale, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(dvar, 2 * f * std**2 + g**2, rtol=1e-10)
        np.testing.assert_allclose(sde.time_of_log_snr(sde.log_snr(t)), t, rtol=1e-9)


@pytest.mark.parametrize("sde", [pf.VPSDE(), pf.SubVPSDE(), pf.VESDE()], ids=["vp", "subvp", "ve"])
def test_marginal_matches_simulated_forward_sde(sde):
    """Euler-Maruyama on the forward SDE (fine steps) reproduces N(scale x0, std^2)."""
    n, t1 = 4000, 0.5
    x0 = 1.5

    def one(key):
        bm = diffrax.VirtualBrownianTree(0.0, t1, tol=1e-3, shape=(), key=key)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: sde.drift(t, y)),
            diffrax.ControlTerm(lambda t, y, a: sde.diffusion(t), bm),
        )
        sol = diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, t1, 1e-3, jnp.asarray(x0))
        return sol.ys[-1]

    xs = jax.vmap(one)(jax.random.split(jax.random.key(0), n))
    scale, std = sde.marginal(t1)
    se_mean = float(std) / math.sqrt(n)
    assert abs(float(xs.mean()) - float(scale) * x0) < 4 * se_mean + 0.01 * float(std)
    np.testing.assert_allclose(float(xs.std()), float(std), rtol=0.05)


def test_prior():
    for sde, s in [(pf.VPSDE(), 1.0), (pf.SubVPSDE(), 1.0), (pf.VESDE(), 50.0)]:
        z = jnp.array([[0.3, -1.2], [2.0, 0.5]])
        ref = scipy.stats.norm(0, s).logpdf(np.asarray(z)).sum()
        np.testing.assert_allclose(sde.prior_logp(z), ref, rtol=1e-6)
        draws = sde.prior_sample(jax.random.key(1), (20000,))
        np.testing.assert_allclose(float(draws.std()), s, rtol=0.03)
        assert sde.T == 1.0


def test_bad_parameters():
    with pytest.raises(ValueError, match="beta_max must be >= beta_min"):
        pf.VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="beta_min"):
        pf.SubVPSDE(beta_min=-1.0)
    with pytest.raises(ValueError, match="sigma_max must be > sigma_min"):
        pf.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        pf.VESDE(sigma_min=float("nan"))


def test_vp_family_shares_one_beta():
    for cls in (pf.VPSDE, pf.SubVPSDE):
        assert issubclass(cls, AbstractLinearBetaSDE)
        assert cls.beta is AbstractLinearBetaSDE.beta
        assert cls.integrated_beta is AbstractLinearBetaSDE.integrated_beta
    with pytest.raises(ValueError, match="beta_max must be >= beta_min"):
        pf.SubVPSDE(beta_min=5.0, beta_max=1.0)


@pytest.mark.parametrize("t", [1e-6, 1e-5, 3e-4, 0.2, 1.0])
def test_subvp_time_of_log_snr_is_exact_in_float32(t):
    sde = pf.SubVPSDE()
    t32 = jnp.float32(t)
    back = sde.time_of_log_snr(sde.log_snr(t32))
    assert back.dtype == jnp.float32
    np.testing.assert_allclose(float(back), float(t32), rtol=2e-6)


def test_importance_sampled_small_times_are_distinct():
    """Issue 11: the old inversion collapsed the draws below 2e-5 onto 9 values."""
    from probflow._loss import sample_time

    t = np.asarray(sample_time(pf.SubVPSDE(), 200_000, key=jax.random.key(0), eps=1e-5,
                               importance_sampling=True))
    small = t[t < 2e-5]
    assert small.size > 1000
    assert np.unique(small).size > 0.95 * small.size


def test_jit_matches_eager_on_a_fused_expm1_reduction():
    """jaxlib 0.10.2's XLA:CPU fused this reduction wrongly (1561.13 instead of 1034.41)."""
    t = jnp.linspace(1e-3, 1, 4096, dtype=jnp.float32)
    f = lambda t: jnp.sum(jnp.expm1(-2 * t) * jnp.expm1(-t))
    eager = float(f(t))
    np.testing.assert_allclose(float(jax.jit(f)(t)), eager, rtol=1e-5)
    ref = np.sum(np.expm1(-2 * np.asarray(t, np.float64)) * np.expm1(-np.asarray(t, np.float64)))
    np.testing.assert_allclose(eager, ref, rtol=1e-5)


def test_subvp_weighting_uses_one_expm1():
    """g^2 / std^2 (the likelihood weighting) compiles to a single expm1 of -B(t)."""
    sde = pf.SubVPSDE()
    f = jax.jit(lambda t: jnp.sum(jax.vmap(sde.diffusion)(t) ** 2 / sde.marginal(t)[1] ** 2))
    t = jnp.linspace(1e-3, 1, 4096, dtype=jnp.float32)
    hlo = f.lower(t).compile().as_text()
    assert hlo.count("exponential-minus-one(") == 1
    t64 = np.asarray(t, np.float64)
    b = 0.1 * t64 + 0.5 * 19.9 * t64**2
    ref = np.sum((0.1 + 19.9 * t64) * (1 - np.exp(-2 * b)) / (1 - np.exp(-b)) ** 2)
    np.testing.assert_allclose(float(f(t)), ref, rtol=1e-4)
