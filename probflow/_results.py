"""Result objects: every field is an array with a leading batch axis (and a few static flags).

`nfe` is the number of score-model evaluations spent on each example: every Runge--Kutta stage,
rejected steps, the two evaluations of the initial step-size selection, and corrector steps.
`num_steps` is the number of solver steps attempted (accepted and rejected).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import equinox as eqx
import numpy as np
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
    #: One estimate per probe [B, P] (`logp` is their mean); P = 1 for the exact trace.
    logp_probes: Float[Array, "B P"]
    #: Whether the divergence was exact (no probe noise at all).
    exact_trace: bool = eqx.field(static=True, default=False)


class BitsPerDimResult(eqx.Module):
    """`bpd` [B] (see `bits_per_dim` for the formula), `logp` [B] in model space, `z`, cost."""

    bpd: Float[Array, " B"]
    logp: Float[Array, " B"]
    #: The latents (of the first dequantization draw); None for `method="elbo"`.
    z: Array | None
    nfe: Int[Array, " B"]
    num_steps: Int[Array, " B"]
    #: One value per probe [B, P] (`bpd` is their mean); P = 1 for the exact trace.
    bpd_probes: Float[Array, "B P"]
    #: Whether the divergence was exact (no probe noise at all).
    exact_trace: bool = eqx.field(static=True, default=False)
    #: [B, K, P] log p(y_k) - log q(y_k | x) in nats per dequantization draw k and probe p (model
    #: space, cell width included); `bpd_probes` combines the K draws by log-mean-exp.
    log_weights: Float[Array, "B K P"] | None = None


class ELBOResult(eqx.Module):
    """`nll` [B]: the variational upper bound on -log p(x) in nats (`pf.elbo`), its Monte Carlo
    standard error `stderr` [B], the score evaluations `nfe` [B], and its three terms [B]
    (nll = prior + diffusion + reconstruction)."""

    nll: Float[Array, " B"]
    stderr: Float[Array, " B"]
    nfe: Int[Array, " B"]
    prior: Float[Array, " B"]
    diffusion: Float[Array, " B"]
    reconstruction: Float[Array, " B"]


# --------------------------------------------------------------------------- error bars


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitsPerDimSummary:
    """A data set's bits/dim with error bars that say what they contain (all in bits/dim).

    From values b[r, i, p] (repeat r with fresh dequantization noise, image i, probe p), by the
    method of moments for nested noise (unbiased variances, clipped at 0):

    - `mean`: the mean over everything;
    - `sem`: its standard error, std(per-image means) / sqrt(num_images). The images are
      independent draws, so this holds every source (images, dequantization, probes): it is the
      error bar of `mean` as an estimate of the expected bits/dim of the data distribution;
    - `spread`: std between the per-image estimates (sem = spread / sqrt(num_images));
    - `image_spread`: std between images of their expected bits/dim, probe noise taken out (and
      dequantization noise too when num_repeats >= 2; with one repeat it is included);
    - `dequantization_noise`: std between dequantizations of one image (NaN with one repeat);
    - `probe_noise`: std of a single probe's estimate around its image's value (0 for the exact
      trace; NaN with one probe, where it cannot be told apart from the rest);
    - `probe_sem`: the part of the standard error due to probes alone,
      probe_noise / sqrt(num_images num_repeats num_probes): how far `mean` is from what the
      exact trace would give on the same dequantized images.
    """

    mean: float
    sem: float
    spread: float
    image_spread: float
    dequantization_noise: float
    probe_noise: float
    probe_sem: float
    num_images: int
    num_repeats: int
    num_probes: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        def fmt(v):
            return "n/a" if math.isnan(v) else f"{v:.4f}"

        return (
            f"{self.mean:.4f} +- {fmt(self.sem)} bits/dim (standard error over "
            f"{self.num_images} images, {self.num_repeats} dequantization(s), "
            f"{self.num_probes} probe(s) each); spread between images {fmt(self.image_spread)}, "
            f"dequantization noise {fmt(self.dequantization_noise)}, probe noise "
            f"{fmt(self.probe_noise)} per probe (its share of the standard error "
            f"{fmt(self.probe_sem)})"
        )


def summarize_bits_per_dim(
    results: BitsPerDimResult | Sequence[BitsPerDimResult],
) -> BitsPerDimSummary:
    """Mean bits/dim of a data set, its standard error, and what the error contains.

    `results`: one `bits_per_dim` result, or several over the same images in the same order, each
    with a fresh `key` (fresh dequantization noise and probes, as the paper repeats its test set).
    See `BitsPerDimSummary` for what each number means.

    **Arguments:**

    - `results`: one `BitsPerDimResult`, or several over the same images with fresh keys.
    """
    if isinstance(results, BitsPerDimResult):
        results = [results]
    results = list(results)
    if not results or not all(isinstance(r, BitsPerDimResult) for r in results):
        raise ValueError("results must be a BitsPerDimResult or a non-empty list of them")
    shapes = {tuple(r.bpd_probes.shape) for r in results}
    if len(shapes) != 1:
        raise ValueError(
            "every result must cover the same images with the same number of probes, got "
            f"bpd_probes shapes {sorted(shapes)}"
        )
    exact = {r.exact_trace for r in results}
    if len(exact) != 1:
        raise ValueError("results mix the exact trace with Hutchinson estimates")
    b = np.stack([np.asarray(r.bpd_probes, np.float64) for r in results])  # [R, N, P]
    return _summarize(b, exact=exact.pop())


def _var(a, axis):
    n = a.shape[axis]
    return np.var(a, axis=axis, ddof=1) if n >= 2 else np.full(np.delete(a.shape, axis), np.nan)


def _summarize(b: np.ndarray, *, exact: bool) -> BitsPerDimSummary:
    num_repeats, num_images, num_probes = b.shape
    cells = b.mean(axis=2)  # [R, N]: one estimate per dequantized image
    images = cells.mean(axis=0)  # [N]
    if exact:
        probe_var = 0.0
    else:
        probe_var = float(np.mean(_var(b, 2)))  # NaN with one probe
    within = float(np.mean(_var(cells, 0)))  # E = deq_var + probe_var / P; NaN with one repeat
    deq_var = max(within - probe_var / num_probes, 0.0) if not math.isnan(within) else math.nan
    total = float(_var(images, 0)) if num_images >= 2 else math.nan
    # E[total] = image_var + deq_var / R + probe_var / (R P); with one repeat, deq_var stays in.
    noise = probe_var / (num_repeats * num_probes)
    if num_repeats >= 2:
        noise += deq_var / num_repeats
    image_var = max(total - noise, 0.0) if not math.isnan(total + noise) else math.nan
    sqrt = lambda v: math.sqrt(v) if not math.isnan(v) else math.nan
    return BitsPerDimSummary(
        mean=float(b.mean()),
        sem=sqrt(total / num_images),
        spread=sqrt(total),
        image_spread=sqrt(image_var),
        dequantization_noise=sqrt(deq_var),
        probe_noise=sqrt(probe_var),
        probe_sem=sqrt(probe_var / (num_images * num_repeats * num_probes)),
        num_images=num_images,
        num_repeats=num_repeats,
        num_probes=num_probes,
    )
