"""Result objects: every field is an array with a leading batch axis.

`nfe` is the number of score-model evaluations spent on each example: every Runge--Kutta stage,
rejected steps, the two evaluations of the initial step-size selection, and corrector steps.
`num_steps` is the number of solver steps attempted (accepted and rejected).
"""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float, Int


class SampleResult(eqx.Module):
    """Samples `x` [B, ...] and the evaluations `nfe` [B] that produced them."""

    x: Array
    nfe: Int[Array, " B"]
    num_steps: Int[Array, " B"]


class EncodeResult(eqx.Module):
    """Latents `z` = x(T) [B, ...] from the probability-flow ODE started at the data."""

    z: Array
    nfe: Int[Array, " B"]
    num_steps: Int[Array, " B"]


class DecodeResult(eqx.Module):
    """Data `x` = x(eps) [B, ...] from the probability-flow ODE run back from the latents."""

    x: Array
    nfe: Int[Array, " B"]
    num_steps: Int[Array, " B"]


class LikelihoodResult(eqx.Module):
    """`logp` [B] in nats, the latents `z` [B, ...], and the cost."""

    logp: Float[Array, " B"]
    z: Array
    nfe: Int[Array, " B"]
    num_steps: Int[Array, " B"]


class BitsPerDimResult(eqx.Module):
    """`bpd` [B] (see `bits_per_dim` for the formula), `logp` [B] in model space, `z`, cost."""

    bpd: Float[Array, " B"]
    logp: Float[Array, " B"]
    z: Array
    nfe: Int[Array, " B"]
    num_steps: Int[Array, " B"]
