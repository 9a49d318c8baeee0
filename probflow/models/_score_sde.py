"""The paper's score conventions around its network: `get_score_fn(sde, model, continuous=True)` of
score_sde (models/utils.py), for one example."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from .._sde import VESDE, VPSDE, AbstractSDE, SubVPSDE
from ._ddpmpp import NCSNpp


class ScoreSDEModel(eqx.Module):
    """`model(t, x) -> score` for a network of the paper's code (`pf.load_score_sde` builds it).

    VP and sub-VP: the network gets 999 t and predicts the noise, so score = -net(x, 999 t) / std(t)
    with std(t) the marginal std of eq. 29 (sqrt(1 - e^-B) for VP, 1 - e^-B for sub-VP). VE: the
    network gets sigma(t) = sigma_min (sigma_max / sigma_min)^t and its output is the score.
    `x` is one example [H, W, C] in `data_range`; the network runs in the dtype of `x` (its float32
    weights are cast), so float64 works under x64. Dropout is off, as in the paper's evaluation.
    """

    net: NCSNpp
    sde: AbstractSDE
    shape: tuple[int, int, int] = eqx.field(static=True)
    data_range: tuple[float, float] = eqx.field(static=True)

    def __init__(self, net: NCSNpp, sde: AbstractSDE):
        self.net = net
        self.sde = sde
        h, w, c = net.shape
        self.shape = (h, w, c)
        self.data_range = (-1.0, 1.0) if net.centered else (0.0, 1.0)

    def __check_init__(self):
        if not isinstance(self.sde, (VPSDE, SubVPSDE, VESDE)):
            raise ValueError(
                f"sde must be a VPSDE, SubVPSDE or VESDE, got {type(self.sde).__name__}"
            )

    def __call__(self, t: ArrayLike, x: ArrayLike, *, key: PRNGKeyArray | None = None) -> Array:
        del key  # evaluation mode: no dropout
        x = jnp.asarray(x)
        if x.shape != self.shape:
            raise ValueError(
                f"x must be one example of shape {self.shape} (no batch axis; vmap the model "
                f"for batches), got shape {x.shape}"
            )
        dtype = jnp.result_type(x.dtype, float)
        x = x.astype(dtype)
        t = jnp.asarray(t, dtype=dtype)
        net = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, self.net)
        if isinstance(self.sde, VESDE):
            return net(x, self.sde.sigma(t))
        _, std = self.sde.marginal(t)
        return -net(x, 999.0 * t) / std
