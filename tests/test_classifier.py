"""Classifiers against the Bayes-optimal (exact mixture) posteriors, and the Frechet distance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from test_checkpoint import _same_tree, flip_every_bit

import probflow as pf
import probflow._classifier
from probflow._checkpoint import CLASSIFIER, MAGIC, CheckpointError, _load, read_checkpoint
from probflow._classifier import (
    AbstractClassifier,
    ClassifierConfig,
    DataClassifier,
    NoiseConditionalClassifier,
    classify,
    load_classifier,
    save_classifier,
    train_classifier,
)

frechet_distance = pf.frechet_distance

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


def test_frechet_distance_lives_with_the_metrics():
    from probflow import _metrics

    assert pf.frechet_distance is _metrics.frechet_distance
    with pytest.raises(ValueError, match="same number of features"):
        pf.frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))


@pytest.fixture(scope="module", params=["data", "noise-conditional"])
def saved_classifier(request, tmp_path_factory):
    key = jax.random.key(7)
    if request.param == "data":
        clf = DataClassifier((3,), 4, width=8, depth=1, key=key)
    else:
        clf = NoiseConditionalClassifier((3,), 4, pf.SubVPSDE(beta_max=12.0), width=8, depth=1,
                                         key=key)
    path = tmp_path_factory.mktemp("clf") / "c.eqx"
    save_classifier(path, clf, {"accuracy": 0.5, "data": "toy"})
    return path, clf


def test_classifiers_share_the_checkpoint_format(saved_classifier, tmp_path):
    path, clf = saved_classifier
    assert path.read_bytes().startswith(MAGIC)
    header, _, _ = read_checkpoint(path)
    assert header["kind"] == "classifier" and header["model"]["class"] == type(clf).__name__
    clf2, info = load_classifier(path)
    assert _same_tree(clf2, clf) and info == {"accuracy": 0.5, "data": "toy"}
    assert clf2.sde == clf.sde
    with pytest.raises(CheckpointError, match="not a score-model.*load_classifier"):
        pf.load_checkpoint(path)
    model_file = tmp_path / "m.eqx"
    sde = pf.VPSDE()
    pf.save_checkpoint(model_file, pf.models.MLP(2, sde=sde, width=4, depth=1,
                                                 key=jax.random.key(0)), sde)
    with pytest.raises(CheckpointError, match="not a classifier.*load_checkpoint"):
        load_classifier(model_file)


def test_every_header_bit_of_a_classifier_file(saved_classifier, tmp_path):
    path, clf = saved_classifier
    outcomes = flip_every_bit(
        path, tmp_path, lambda p: load_classifier(p)[0],
        lambda b, p: _load(b, p, CLASSIFIER, AbstractClassifier)[0],
        lambda c: _same_tree(c, clf))
    assert outcomes["error"] > 4000


def test_train_classifier_runs_exactly_the_steps_asked_for(monkeypatch):
    calls = []
    schedule = optax.cosine_decay_schedule

    def counting_schedule(*args, **kwargs):
        inner = schedule(*args, **kwargs)

        def lr(count):
            jax.debug.callback(lambda c: calls.append(int(c)), count)
            return inner(count)

        return lr

    monkeypatch.setattr(optax, "cosine_decay_schedule", counting_schedule)
    x_int = jax.random.randint(jax.random.key(0), (64, 2), 0, 8)
    labels = (x_int[:, 0] > 3).astype(jnp.int32)
    monkeypatch.setattr(probflow._classifier, "_CHUNK", 4)  # whole chunks and a remainder
    train_classifier(x_int, labels, num_bins=8, config=ClassifierConfig(steps=10, batch_size=8))
    jax.effects_barrier()
    assert sorted(calls) == list(range(10))  # one optimiser update per step, no more


TRACES = []


class CountingClassifier(AbstractClassifier):
    """Counts how often it is traced (in TRACES)."""

    shape: tuple[int, ...]
    num_classes: int
    sde: None
    weight: jax.Array

    def __init__(self):
        self.shape, self.num_classes, self.sde = (2,), 3, None
        self.weight = jnp.arange(6.0).reshape(2, 3)

    @property
    def hyperparameters(self):
        return {}

    def features(self, t, x):
        TRACES.append(1)
        return x @ self.weight

    def __call__(self, t, x):
        return self.features(t, x)


def test_classify_compiles_once():
    TRACES.clear()
    clf = CountingClassifier()
    x = jnp.array([[1.0, 0.0], [0.0, -1.0], [2.0, 2.0]])
    for t in (0.0, 0.3, 0.5):
        labels = classify(clf, x, t)
    np.testing.assert_array_equal(np.asarray(labels), [2, 0, 2])
    assert len(TRACES) == 1
