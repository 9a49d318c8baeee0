"""Controllable generation against exact conditionals of Gaussian mixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._controllable import colorize, grey_basis, inpaint, sample_conditional

GM3 = pf.GaussianMixture(
    [0.4, 0.6],
    [[-1.0, 0.5, 0.0], [1.2, -0.5, 0.8]],
    [np.eye(3) * 0.3 + 0.1, [[0.5, 0.2, 0.1], [0.2, 0.4, 0.0], [0.1, 0.0, 0.3]]],
)


def _sw(a, b):
    return float(pf.sliced_wasserstein(a, b, key=jax.random.key(3)))


@pytest.mark.parametrize("sde", [pf.VPSDE(), pf.VESDE()], ids=["vp", "ve"])
def test_smc_inpainting_samples_the_exact_conditional(sde):
    n, v = 800, 0.3
    model = GM3.score_model(sde)
    x = jnp.tile(jnp.array([[v, 0.0, 0.0]]), (n, 1))
    mask = jnp.array([1.0, 0.0, 0.0])
    r = inpaint(model, sde, x, mask, key=jax.random.key(0), steps=150, num_particles=16,
                corrector=None)
    assert np.all(np.asarray(r.x[:, 0]) == v)  # known values come back exactly
    assert int(r.nfe[0]) == 16 * (150 + 1)
    cond = GM3.condition([True, False, False], [v])
    ex1, ex2 = cond.sample(jax.random.key(1), n), cond.sample(jax.random.key(2), n)
    assert _sw(r.x[:, 1:], ex1) < 2.5 * _sw(ex2, ex1)


def test_replacement_inpainting_keeps_known_values():
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    x = GM3.sample(jax.random.key(0), 64)
    mask = jnp.array([1.0, 0.0, 1.0])
    r = inpaint(model, sde, x, mask, key=jax.random.key(1), steps=100)
    np.testing.assert_array_equal(r.x[:, 0], x[:, 0])
    np.testing.assert_array_equal(r.x[:, 2], x[:, 2])
    assert not np.allclose(r.x[:, 1], x[:, 1])
    assert int(r.nfe[0]) == 100 * 2 + 1  # predictor + one corrector step, + denoising
    assert np.all(np.isfinite(np.asarray(r.x)))


def test_colorization_samples_the_exact_conditional_given_grey():
    """Single colour pixels from a 3-d mixture; grey = mean of the channels."""
    sde = pf.VPSDE()
    gm = pf.GaussianMixture(
        [0.5, 0.5], [[0.8, 0.2, 0.1], [0.1, 0.3, 0.9]],
        [np.eye(3) * 0.02 + 0.01, np.eye(3) * 0.03 + 0.005],
    )
    inner = gm.score_model(sde)
    model = lambda t, x: inner(t, x.reshape(3)).reshape(1, 1, 3)
    n, g = 800, 0.4
    gray = jnp.full((n, 1, 1, 1), g)
    r = colorize(model, sde, gray, key=jax.random.key(0), steps=150, num_particles=16,
                 corrector=None)
    assert r.x.shape == (n, 1, 1, 3)
    np.testing.assert_allclose(r.x.mean(-1), gray[..., 0], atol=1e-5)
    # The exact conditional: rotate the mixture by the grey basis, condition on the grey axis.
    m = np.asarray(grey_basis(), np.float64)
    q_, r_ = np.linalg.qr(m.T)
    m = q_.T * np.sign(np.diag(r_))[:, None]  # re-orthonormalise in float64
    rot = pf.GaussianMixture(gm.weights, np.asarray(gm.means) @ m.T,
                             m @ np.asarray(gm.covs, np.float64) @ m.T)
    cond = rot.condition([True, False, False], [np.sqrt(3) * g])
    y = r.x.reshape(n, 3) @ m.T
    ex1, ex2 = cond.sample(jax.random.key(1), n), cond.sample(jax.random.key(2), n)
    assert _sw(y[:, 1:], ex1) < 2.5 * _sw(ex2, ex1)


@pytest.mark.parametrize("sde", [pf.VPSDE(), pf.SubVPSDE()], ids=["vp", "subvp"])
def test_exact_classifier_gives_exact_component_samples(sde):
    n = 1000
    model = GM3.score_model(sde)
    r = sample_conditional(model, GM3.classifier(sde), sde, jnp.zeros(n, jnp.int32), (3,),
                           key=jax.random.key(0), steps=200)
    comp = pf.GaussianMixture([1.0], GM3.means[:1], GM3.covs[:1])
    ex1, ex2 = comp.sample(jax.random.key(1), n), comp.sample(jax.random.key(2), n)
    assert _sw(r.x, ex1) < 2.5 * _sw(ex2, ex1)


def test_bad_input():
    sde = pf.VPSDE()
    model = GM3.score_model(sde)
    x = GM3.sample(jax.random.key(0), 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        inpaint(model, sde, x, jnp.ones((2,)), key=key, steps=5)
    with pytest.raises(ValueError, match="only 0"):
        inpaint(model, sde, x, jnp.full((3,), 0.5), key=key, steps=5)
    with pytest.raises(ValueError, match="corrector=None"):
        inpaint(model, sde, x, jnp.ones((3,)), key=key, steps=5, num_particles=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        sample_conditional(model, GM3.classifier(sde), sde, jnp.array([0, 2]), (3,), key=key,
                           steps=5)
    with pytest.raises(ValueError, match="single channel"):
        colorize(model, sde, jnp.zeros((2, 4, 4, 3)), key=key, steps=5)


def test_inpainted_digits_are_recognised():
    """Left halves of test digits known; the clean classifier reads the completed digits."""
    model, sde = pf.load_pretrained("digits-vp")
    test = pf.data.load("digits", "test")
    n = 40
    x = test.to_model_space()[:n]
    mask = np.zeros((8, 8, 1), np.float32)
    mask[:, :4] = 1.0
    r = inpaint(model, sde, x, mask, key=jax.random.key(0), steps=200)
    clf = pf.load_pretrained_classifier("digits-classifier")
    acc = float(jnp.mean(pf.classify(clf, jnp.clip(r.x, 0.0, 1.0)) == test.labels[:n]))
    # Chance is 0.1; half a digit alone (the rest left at 0) is much harder to read.
    blank = float(jnp.mean(pf.classify(clf, x * mask) == test.labels[:n]))
    assert acc > 0.4 and acc > blank + 0.1, (acc, blank)
