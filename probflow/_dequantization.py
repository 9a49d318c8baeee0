"""Dequantization: how integer data becomes continuous for a density model, and the bound it gives.

Integer levels x (num_bins per dimension) own the cells lo + w [x, x + 1) of model space,
w = (hi - lo) / num_bins (`data._dataset.to_model_space`); a density p on model space is a
discrete model P(x) = int_cell(x) p(y) dy. A dequantization is a density q(y | x) on the cell, and

    -log P(x) <= E_q[-log p(y) + log q(y | x)]                       (Jensen; Theis et al. 2016)
    -log P(x) <= E[-log (1/K) sum_k p(y_k) / q(y_k | x)],  y_k ~ q   (importance-weighted, any K)

the second tighter as K grows and equal to -log P(x) as K -> infinity (Burda et al. 2016; the
evaluation of i-DODE and VDM). Every dequantization here uses the same cells, so every bound is on
the same discrete likelihood. The objects draw u in [0, 1)^D (the position inside the cell, in
units of w) and return log q_u(u | x); the density on model space is q_u / w^D.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import erf
from jaxtyping import Array, PRNGKeyArray

from ._sde import AbstractSDE


class AbstractDequantization(eqx.Module):
    """A density q(u | x) on the unit cell of each level; see the module docstring."""

    @abc.abstractmethod
    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype, *, bin_width: float,
        sde: AbstractSDE, eps: float,
    ) -> tuple[Array, Array]:
        """Draws u [B, ...] in [0, 1] and their log q_u(u | x) [B] (nats, per example).

        `bin_width` is w in model space, `sde` and `eps` the time the density is taken at (the
        truncated-normal dequantization matches its noise to them).
        """


class UniformDequantization(AbstractDequantization):
    """u ~ U[0, 1)^D: q is uniform on the cell, log q_u = 0 (the paper's dequantization)."""

    def sample(self, key, shape, dtype, *, bin_width, sde, eps):
        del bin_width, sde, eps
        return jax.random.uniform(key, shape, dtype), jnp.zeros(shape[:1], dtype)


class TruncatedNormalDequantization(AbstractDequantization):
    """Training-free truncated-normal dequantization (Zheng et al. 2023, i-DODE, section 4.2).

    The data at time eps is x_eps = scale x_0 + std z; i-DODE truncates z to the cell, so that
    y = c + (std / scale) e with c the cell's centre and e ~ N(0, I) truncated to [-tau, tau]^D,
    tau = scale w / (2 std) (w the cell's width), and

        log q(y | x) = sum_i log phi(e_i) - D log Z - D log(std / scale),  Z = erf(tau / sqrt 2).

    q matches the noise the model was trained to remove at eps, so p_eps(y) / q(y | x) is nearly
    constant over the cell and the bound is much tighter than uniform's. i-DODE's cells are the
    data cells times scale(eps) (1 - 5e-7 for VP at eps = 1e-5); here they are the data cells
    themselves, as for every dequantization, so that all bound the same discrete likelihood.
    """

    def sample(self, key, shape, dtype, *, bin_width, sde, eps):
        scale, std = sde.marginal(jnp.asarray(eps, dtype))
        tau = (scale * bin_width / (2.0 * std)).astype(dtype)
        e = jax.random.truncated_normal(key, -tau, tau, shape, dtype)
        # u = 1/2 + e / (2 tau) puts y = c + (std / scale) e; clipped against rounding only.
        u = jnp.clip(0.5 + e / (2.0 * tau), 0.0, 1.0)
        d = math.prod(shape[1:])
        log_z = jnp.log(erf(tau / math.sqrt(2.0)))
        log_phi = -0.5 * e * e - 0.5 * math.log(2.0 * math.pi)
        # log q_u = log q_e + D log(2 tau): u = 1/2 + e / (2 tau) (density per unit of u).
        log_q = jnp.sum(log_phi.reshape(shape[0], -1), axis=1) - d * log_z + d * jnp.log(2.0 * tau)
        return u, log_q


def as_dequantization(dequantization) -> AbstractDequantization:
    """The public argument as an object (`None` is the default, uniform)."""
    if dequantization is None:
        return UniformDequantization()
    if isinstance(dequantization, str):
        names = {"uniform": UniformDequantization, "truncated_normal":
                 TruncatedNormalDequantization}
        if dequantization not in names:
            raise ValueError(
                f"dequantization must be one of {tuple(names)} or a dequantization object, got "
                f"{dequantization!r}"
            )
        return names[dequantization]()
    if not isinstance(dequantization, AbstractDequantization):
        raise ValueError(
            "dequantization must be pf.UniformDequantization() or "
            f"pf.TruncatedNormalDequantization(), got {type(dequantization).__name__}"
        )
    return dequantization


def importance_weighted(log_weights: Array) -> Array:
    """log (1/K) sum_k exp(log_weights[:, k, ...]): the importance-weighted log-likelihood bound
    from K draws [B, K, ...] (each log p(y_k) - log q(y_k | x))."""
    k = log_weights.shape[1]
    return jax.nn.logsumexp(log_weights, axis=1) - math.log(k)
