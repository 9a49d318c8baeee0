"""What every score network shares: the preconditioning that turns a network into a score."""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._sde import AbstractSDE
from .._validate import check_positive_int as check_positive_int


class AbstractScoreModel(eqx.Module):
    """`model(t, x) -> score` for one example: score = -network(log std(t), c_in x) / std(t).

    The network predicts the noise z in x_t = scale(t) x_0 + std(t) z (so the score of
    p_0t(x_t | x_0) is -z / std(t), eq. 7) and is conditioned on log std(t), which resolves
    small times (t ~ 1e-5) that features of raw t cannot. c_in = 1 / sqrt(scale^2 sigma_data^2 +
    std^2) keeps the network's input at unit scale for every SDE (VE's std reaches 50).

    Subclasses (users' own included) can be saved with `pf.save_checkpoint`: `hyperparameters`
    are the JSON-serialisable constructor arguments besides `sde` and `key`, so that
    `cls(**hyperparameters, sde=sde, key=key)` rebuilds the model; define the class at module
    level and import its module before `pf.load_checkpoint`.
    """

    sde: eqx.AbstractVar[AbstractSDE]
    shape: eqx.AbstractVar[tuple[int, ...]]
    sigma_data: eqx.AbstractVar[float]

    @abc.abstractmethod
    def network(self, c_noise: Array, x: Array, *, key: PRNGKeyArray | None) -> Array:
        """The noise prediction for one (scaled) example `x` at noise level `c_noise`."""

    @property
    @abc.abstractmethod
    def hyperparameters(self) -> dict:
        """The constructor arguments (besides `sde` and `key`) that rebuild this model, as JSON
        values (tuples as lists)."""

    def __call__(self, t: ArrayLike, x: ArrayLike, *, key: PRNGKeyArray | None = None) -> Array:
        x = jnp.asarray(x)
        if x.shape != tuple(self.shape):
            raise ValueError(
                f"x must be one example of shape {tuple(self.shape)} (no batch axis; vmap the "
                f"model for batches), got shape {x.shape}"
            )
        t = jnp.asarray(t, dtype=jnp.result_type(x.dtype, float))
        scale, std = self.sde.marginal(t)
        c_in = jax.lax.rsqrt(scale**2 * self.sigma_data**2 + std**2)
        out = self.network(jnp.log(std), c_in * x, key=key)
        return (-out / std).astype(x.dtype)


class GaussianFourierFeatures(eqx.Module):
    """[sin(2 pi w c), cos(2 pi w c)] with fixed random frequencies w ~ N(0, scale^2)."""

    frequencies: Array

    def __init__(self, num_features: int, scale: float, *, key: PRNGKeyArray):
        self.frequencies = scale * jax.random.normal(key, (num_features // 2,))

    def __call__(self, c: Array) -> Array:
        w = jax.lax.stop_gradient(self.frequencies)  # fixed, not trained
        arg = 2 * math.pi * w * c
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


class Dense(eqx.Module):
    """y = x W + b on the last axis."""

    weight: Array
    bias: Array

    def __init__(self, n_in: int, n_out: int, *, key: PRNGKeyArray, init_scale: float = 1.0):
        bound = init_scale * math.sqrt(3.0 / n_in)  # variance init_scale^2 / fan_in
        self.weight = jax.random.uniform(key, (n_in, n_out), minval=-bound, maxval=bound)
        self.bias = jnp.zeros((n_out,))

    def __call__(self, x: Array) -> Array:
        return x @ self.weight + self.bias


