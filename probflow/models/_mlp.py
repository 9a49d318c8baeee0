"""An MLP score network for low-dimensional data (e.g. 2-d toys and Gaussian mixtures)."""

from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray

from .._sde import AbstractSDE
from ._base import AbstractScoreModel, Dense, GaussianFourierFeatures, check_positive_int


class MLP(AbstractScoreModel):
    """A residual MLP on flattened x with Gaussian Fourier features of log std(t)."""

    sde: AbstractSDE
    shape: tuple[int, ...] = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    fourier_scale: float = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    embed: GaussianFourierFeatures
    embed_dense: Dense
    inp: Dense
    hidden: tuple[Dense, ...]
    cond: tuple[Dense, ...]
    out: Dense

    def __init__(
        self,
        shape,
        *,
        sde: AbstractSDE,
        width: int = 128,
        depth: int = 3,
        fourier_scale: float = 1.0,
        sigma_data: float = 0.5,
        key: PRNGKeyArray,
    ):
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
        check_positive_int(width, "width")
        check_positive_int(depth, "depth")
        self.sde = sde
        self.shape = shape
        self.width = width
        self.depth = depth
        self.fourier_scale = float(fourier_scale)
        self.sigma_data = float(sigma_data)
        d = 1
        for s in shape:
            d *= s
        keys = jax.random.split(key, 5)
        self.embed = GaussianFourierFeatures(64, self.fourier_scale, key=keys[0])
        self.embed_dense = Dense(64, width, key=keys[1])
        self.inp = Dense(d, width, key=keys[2])
        hk = jax.random.split(keys[3], 2 * depth)
        self.hidden = tuple(Dense(width, width, key=k) for k in hk[:depth])
        self.cond = tuple(Dense(width, width, key=k) for k in hk[depth:])
        self.out = Dense(width, d, key=keys[4], init_scale=1e-3)

    def __check_init__(self):
        if not isinstance(self.sde, AbstractSDE):
            raise ValueError(f"sde must be a probflow SDE, got {type(self.sde).__name__}")

    @property
    def hyperparameters(self) -> dict:
        return dict(
            shape=list(self.shape),
            width=self.width,
            depth=self.depth,
            fourier_scale=self.fourier_scale,
            sigma_data=self.sigma_data,
        )

    def network(self, c_noise: Array, x: Array, *, key: PRNGKeyArray | None) -> Array:
        del key
        emb = jax.nn.silu(self.embed_dense(self.embed(c_noise)))
        h = self.inp(x.reshape(-1))
        for layer, cond in zip(self.hidden, self.cond, strict=True):
            h = h + layer(jax.nn.silu(h + cond(emb)))
        return self.out(jax.nn.silu(h)).reshape(self.shape)


