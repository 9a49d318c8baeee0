"""Classifiers against the Bayes-optimal (exact mixture) posteriors, and the Frechet distance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import probflow as pf
from probflow._checkpoint import CheckpointError
from probflow._classifier import (
    ClassifierConfig,
    classify,
    frechet_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)

LO, HI, BINS = -4.0, 4.0, 256


@pytest.fixture(scope="module")
def two_class():
    gm = pf.GaussianMixture([0.5, 0.5], [[-0.8, 0.3], [0.8, -0.3]], [np.eye(2) * 0.5] * 2)
    key = jax.random.key(0)
    n = 4000
    comp = jax.random.bernoulli(key, 0.5, (n,)).astype(jnp.int32)
    x = jnp.asarray(gm.means)[comp] + jnp.sqrt(0.5) * jax.random.normal(jax.random.key(1), (n, 2))
    x_int = jnp.clip(jnp.floor((x - LO) / (HI - LO) * BINS), 0, BINS - 1).astype(jnp.int32)
    return gm, x_int, comp


def _to_model(x_int):
    return LO + (HI - LO) * (x_int + 0.5) / BINS


def test_clean_classifier_reaches_bayes_accuracy(two_class):
    gm, x_int, labels = two_class
    clf = train_classifier(x_int, labels, num_bins=BINS, data_range=(LO, HI),
                           config=ClassifierConfig(steps=1000))
    x = _to_model(x_int)
    bayes = jax.vmap(lambda xi: jnp.argmax(gm.component_log_joint(xi, None, 0.0)))(x)
    bayes_acc = float((bayes == labels).mean())
    acc = float((classify(clf, x) == labels).mean())
    assert 0.7 < bayes_acc < 0.95  # the task is not trivial
    assert acc > bayes_acc - 0.02


def test_noise_conditional_classifier_matches_exact_posterior(two_class, tmp_path):
    gm, x_int, labels = two_class
    sde = pf.VPSDE()
    clf = train_classifier(x_int, labels, num_bins=BINS, data_range=(LO, HI), sde=sde,
                           config=ClassifierConfig(steps=2000))
    exact = gm.classifier(sde)
    pts = gm.sample(jax.random.key(3), 500)
    for t in (0.05, 0.3, 0.6):
        scale, std = sde.marginal(t)
        xt = scale * pts + std * jax.random.normal(jax.random.key(4), pts.shape)
        p_hat = jax.nn.softmax(jax.vmap(clf, in_axes=(None, 0))(t, xt))
        p = jnp.exp(jax.vmap(exact, in_axes=(None, 0))(t, xt))
        assert float(jnp.mean(jnp.abs(p_hat - p))) < 0.06
    save_classifier(tmp_path / "c.eqx", clf, {"x": 1})
    clf2, info = load_classifier(tmp_path / "c.eqx")
    np.testing.assert_allclose(clf2(0.3, pts[0]), clf(0.3, pts[0]), rtol=1e-6)
    assert info == {"x": 1}
    raw = (tmp_path / "c.eqx").read_bytes()
    (tmp_path / "bad.eqx").write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match="bad.eqx"):
        load_classifier(tmp_path / "bad.eqx")


def test_frechet_distance_closed_form():
    a = jax.random.normal(jax.random.key(0), (20000, 3))
    mu = jnp.array([1.0, -2.0, 0.5])
    b = mu + 2.0 * jax.random.normal(jax.random.key(1), (20000, 3))
    # ||mu||^2 + tr(I + 4I - 2 * 2I) = ||mu||^2 + 3
    np.testing.assert_allclose(frechet_distance(a, b), float(mu @ mu) + 3.0, rtol=0.05)
    # Against scipy's matrix square root on correlated features.
    rng = np.random.default_rng(0)
    c = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    d = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)) + 1.0
    ca, cd = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cd).real
    ref = np.sum((c.mean(0) - d.mean(0)) ** 2) + np.trace(ca + cd - 2 * root)
    np.testing.assert_allclose(frechet_distance(c, d), ref, rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="images must be integers"):
        train_classifier(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), num_bins=4)
    with pytest.raises(ValueError, match="labels must have shape"):
        train_classifier(jnp.zeros((4, 2), jnp.int32), jnp.zeros(3, jnp.int32), num_bins=4)
    with pytest.raises(ValueError, match="steps"):
        ClassifierConfig(steps=0)
