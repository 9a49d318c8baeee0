"""Classifiers: a clean-data one (quality metrics, checking inpainted digits) and a
noise-conditional one (class-conditional sampling, paper section 5, eq. 14).

Both are small MLPs over the flattened example. The noise-conditional classifier sees
x_t = scale(t) x_0 + std(t) z at random t and is conditioned on log std(t), like the score models.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._checkpoint import CLASSIFIER, load_module, save_module
from ._sde import AbstractSDE
from ._validate import check_num_bins, check_positive_float, check_positive_int
from .data._dataset import to_model_space
from .models._base import Dense, GaussianFourierFeatures

# Optimiser steps per jitted call of `train_classifier` (the last call runs the remainder).
_CHUNK = 500


class AbstractClassifier(eqx.Module):
    """`classifier(t, x) -> logits [num_classes]` for one example.

    Subclasses can be saved with `save_classifier` like score models with `save_checkpoint`:
    `hyperparameters` are the JSON-serialisable constructor arguments besides `sde` (passed when
    not None) and `key`.
    """

    shape: eqx.AbstractVar[tuple[int, ...]]
    num_classes: eqx.AbstractVar[int]
    sde: eqx.AbstractVar[AbstractSDE | None]

    @property
    @abc.abstractmethod
    def hyperparameters(self) -> dict:
        """The constructor arguments (besides `sde` and `key`) that rebuild this classifier."""

    @abc.abstractmethod
    def features(self, t: ArrayLike, x: Array) -> Array:
        """The last hidden layer: the feature space of the Frechet distance."""

    @abc.abstractmethod
    def __call__(self, t: ArrayLike, x: Array) -> Array:
        """Logits for one example."""


class _MLPBody(eqx.Module):
    layers: list[Dense]

    def __init__(self, n_in: int, width: int, depth: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, depth)
        sizes = [n_in] + [width] * depth
        self.layers = [Dense(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]

    def __call__(self, h: Array) -> Array:
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        return h


class DataClassifier(AbstractClassifier):
    """A classifier of clean data (t is ignored): x -> logits."""

    shape: tuple[int, ...]
    num_classes: int
    width: int
    depth: int
    sde: None
    body: _MLPBody
    head: Dense

    def __init__(self, shape, num_classes: int, *, width: int = 256, depth: int = 2,
                 key: PRNGKeyArray):
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.width, self.depth = int(width), int(depth)
        self.sde = None
        k1, k2 = jax.random.split(key)
        self.body = _MLPBody(math.prod(self.shape), self.width, self.depth, key=k1)
        self.head = Dense(self.width, self.num_classes, key=k2)

    def __check_init__(self):
        check_positive_int(self.num_classes, "num_classes")
        check_positive_int(self.width, "width")
        check_positive_int(self.depth, "depth")

    def features(self, t, x):
        del t
        return self.body(jnp.ravel(x))

    def __call__(self, t, x):
        return self.head(self.features(t, x))

    @property
    def hyperparameters(self) -> dict:
        return {"shape": list(self.shape), "num_classes": self.num_classes,
                "width": self.width, "depth": self.depth}


class NoiseConditionalClassifier(AbstractClassifier):
    """A time-dependent classifier of x_t under `sde`, conditioned on log std(t) (eq. 14)."""

    shape: tuple[int, ...]
    num_classes: int
    width: int
    depth: int
    sde: AbstractSDE
    embed: GaussianFourierFeatures
    body: _MLPBody
    head: Dense

    def __init__(self, shape, num_classes: int, sde: AbstractSDE, *, width: int = 256,
                 depth: int = 3, key: PRNGKeyArray):
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.width, self.depth = int(width), int(depth)
        self.sde = sde
        k0, k1, k2 = jax.random.split(key, 3)
        self.embed = GaussianFourierFeatures(32, 4.0, key=k0)
        self.body = _MLPBody(math.prod(self.shape) + 32, self.width, self.depth, key=k1)
        self.head = Dense(self.width, self.num_classes, key=k2)

    def __check_init__(self):
        check_positive_int(self.num_classes, "num_classes")
        if not isinstance(self.sde, AbstractSDE):
            raise ValueError(f"sde must be a probflow SDE, got {type(self.sde).__name__}")

    def features(self, t, x):
        x = jnp.asarray(x)
        scale, std = self.sde.marginal(jnp.asarray(t, x.dtype))
        # Normalise x_t to unit scale (data assumed roughly within [-1, 1] before scaling).
        c_in = jax.lax.rsqrt(scale**2 * 0.25 + std**2)
        h = jnp.concatenate([c_in * jnp.ravel(x), self.embed(jnp.log(std) / 4.0)])
        return self.body(h)

    def __call__(self, t, x):
        return self.head(self.features(t, x))

    @property
    def hyperparameters(self) -> dict:
        return {"shape": list(self.shape), "num_classes": self.num_classes,
                "width": self.width, "depth": self.depth}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """How to train a classifier: optax Adam, minibatches of dequantized data."""

    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    eps: float = 1e-3  # the smallest diffusion time for a noise-conditional classifier
    seed: int = 0

    def __post_init__(self):
        check_positive_int(self.steps, "steps")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_float(self.learning_rate, "learning_rate")


def train_classifier(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int,
    data_range: tuple[float, float] = (0.0, 1.0),
    sde: AbstractSDE | None = None,
    config: ClassifierConfig = ClassifierConfig(),
    num_classes: int | None = None,
) -> AbstractClassifier:
    """Train a classifier on integer `images` [N, ...] with `labels` [N].

    With `sde`, a noise-conditional classifier of x_t at t ~ U[eps, T]; without, a clean-data one.
    Inputs are uniformly dequantized into `data_range` as in training score models.

    **Arguments:**

    - `images`: integer images [N, ...] in [0, num_bins).
    - `labels`: their classes, ints [N].
    - `num_bins`: the number of levels of the images.
    - `data_range`: the model-space range the images are dequantized into.
    - `sde`: for a noise-conditional classifier, its SDE; None: a clean-data classifier.
    - `config`: a `ClassifierConfig` (steps, batch size, learning rate, weight decay, eps, seed).
    - `num_classes`: the number of classes (None: the largest label + 1).
    """
    num_bins = check_num_bins(num_bins)
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"images must be integers in [0, num_bins), got dtype {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape [N={images.shape[0]}], got {labels.shape}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    shape = tuple(images.shape[1:])
    lo, hi = (float(v) for v in data_range)
    key = jax.random.key(config.seed)
    k_init, k_train = jax.random.split(key)
    if sde is None:
        clf = DataClassifier(shape, num_classes, key=k_init)
    else:
        clf = NoiseConditionalClassifier(shape, num_classes, sde, key=k_init)
    import optax  # imported when training: `import probflow` stays quicker

    opt = optax.adamw(
        optax.cosine_decay_schedule(config.learning_rate, config.steps),
        weight_decay=config.weight_decay,
    )
    params, static = eqx.partition(clf, eqx.is_inexact_array)
    opt_state = opt.init(params)
    n = images.shape[0]

    def loss_fn(params, key):
        model = eqx.combine(params, static)
        kb, ku, kt, kz = jax.random.split(key, 4)
        idx = jax.random.randint(kb, (config.batch_size,), 0, n)
        u = jax.random.uniform(ku, (config.batch_size,) + shape)
        x = to_model_space(images[idx].astype(jnp.float32), u, num_bins, (lo, hi))
        if sde is None:
            t = jnp.zeros((config.batch_size,))
        else:
            t = jax.random.uniform(kt, (config.batch_size,), minval=config.eps, maxval=sde.T)
            scale, std = jax.vmap(sde.marginal)(t)
            bshape = (-1,) + (1,) * len(shape)
            x = scale.reshape(bshape) * x + std.reshape(bshape) * jax.random.normal(kz, x.shape)
        logits = jax.vmap(model)(t, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    @eqx.filter_jit
    def run(params, opt_state, steps):
        def step(carry, i):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(k_train, i))
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), steps)
        return params, opt_state, losses

    # Exactly config.steps steps: whole chunks, then the remainder (at most two compilations).
    done = 0
    while done < config.steps:
        n = min(_CHUNK, config.steps - done)
        params, opt_state, losses = run(params, opt_state, done + jnp.arange(n))
        done += n
        if not bool(jnp.isfinite(losses).all()):
            raise FloatingPointError("classifier training diverged (non-finite loss)")
    return eqx.combine(params, static)


@eqx.filter_jit
def _predict(classifier, x, t):
    return jax.vmap(lambda xi: jnp.argmax(classifier(t, xi)))(x)


def classify(classifier: AbstractClassifier, x: ArrayLike, t: float = 0.0) -> Array:
    """Predicted labels [B] for a batch x of model-space examples (compiled once per shape).

    **Arguments:**

    - `classifier`: a probflow classifier.
    - `x`: a batch of model-space examples [B, ...].
    - `t`: the noise level of `x` (0: clean data).
    """
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    return _predict(classifier, x, jnp.asarray(t, dtype))


def save_classifier(path, classifier: AbstractClassifier, info: dict | None = None) -> None:
    """Write a classifier atomically, in the checkpoints' file format (see `save_checkpoint`);
    `info` is any JSON-serialisable dict, returned by `load_classifier`.

    **Arguments:**

    - `path`: the file to write.
    - `classifier`: the classifier.
    - `info`: any JSON-serialisable dict (None: empty).
    """
    if not isinstance(classifier, AbstractClassifier):
        raise ValueError(
            f"classifier must be an AbstractClassifier, got {type(classifier).__name__}"
        )
    info = {} if info is None else info
    if not isinstance(info, dict):
        raise ValueError(f"info must be a dict or None, got {type(info).__name__}")
    save_module(path, CLASSIFIER, classifier, classifier.sde, {"info": info})


def load_classifier(path) -> tuple[AbstractClassifier, dict]:
    """(classifier, info) from a file written by `save_classifier`.

    **Arguments:**

    - `path`: a file written by `save_classifier`.
    """
    classifier, _, header = load_module(path, CLASSIFIER, AbstractClassifier)
    return classifier, header["info"]


_PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
_PRETRAINED_CLASSIFIERS = ("digits-classifier", "digits-vp-classifier")


def load_pretrained_classifier(name: str) -> AbstractClassifier:
    """A classifier shipped with probflow: "digits-classifier" (clean data) or
    "digits-vp-classifier" (noise-conditional, VP SDE); see scripts/train_classifiers.py.

    **Arguments:**

    - `name`: "digits-classifier" or "digits-vp-classifier".
    """
    if name not in _PRETRAINED_CLASSIFIERS:
        raise ValueError(
            f"unknown pretrained classifier {name!r}; shipped: {', '.join(_PRETRAINED_CLASSIFIERS)}"
        )
    return load_classifier(_PRETRAINED_DIR / f"{name}.eqx")[0]
