"""A data set's bits/dim with honest error bars: K probes and R dequantizations of every image.

The paper evaluates its test set 5 times with fresh dequantization noise (Song et al. 2021,
appendix D); `evaluate_bits_per_dim` does that at the library level and summarises the values
with `summarize_bits_per_dim` (mean, standard error, spread between images, dequantization and
probe noise). The keys follow `probflow bpd`: the batch of images starting at index i in repeat r
uses `fold_in(fold_in(key, r), i)`, so the command line and the library give the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jaxtyping import ArrayLike, PRNGKeyArray

from ._likelihood import bits_per_dim
from ._results import BitsPerDimResult, BitsPerDimSummary, summarize_bits_per_dim
from ._sde import AbstractSDE
from ._validate import check_positive_int


@dataclasses.dataclass(frozen=True)
class BitsPerDimEvaluation:
    """`summary`: the data set's bits/dim and its error bars; `results`: one `BitsPerDimResult`
    per repeat over all images, in order (`bpd_probes` [N, K] each)."""

    summary: BitsPerDimSummary
    results: tuple[BitsPerDimResult, ...]

    @property
    def bpd(self) -> np.ndarray:
        """[N] each image's bits/dim, the mean over its repeats and probes."""
        return np.mean([np.asarray(r.bpd, np.float64) for r in self.results], axis=0)

    @property
    def nfe(self) -> np.ndarray:
        """[R, N] score evaluations of every image in every repeat."""
        return np.stack([np.asarray(r.nfe) for r in self.results])


def evaluate_bits_per_dim(
    model: Callable,
    sde: AbstractSDE,
    x_int: ArrayLike,
    *,
    key: PRNGKeyArray,
    num_probes: int = 1,
    repeats: int = 1,
    batch_size: int | None = None,
    **options,
) -> BitsPerDimEvaluation:
    """Bits/dim of the images `x_int` [N, ...] with `num_probes` Hutchinson probes per image and
    `repeats` fresh dequantizations (each with fresh probes), and what its error bar contains.

    Every repeat runs `bits_per_dim` over all images (in batches of `batch_size`, default all at
    once: its slot scheduler keeps the cost at the mean NFE); `options` go to `bits_per_dim`
    (`num_bins`, `data_range`, `trace`, solver options). The standard error of
    `summary.mean` holds the spread between images and both noises; with more repeats and probes
    only the noises' share falls (as 1/sqrt(repeats) and 1/sqrt(repeats * num_probes)).

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `x_int`: integer images [N, ...].
    - `key`: the PRNG key (fresh dequantization noise and probes per repeat).
    - `num_probes`: Hutchinson probes per image.
    - `repeats`: fresh dequantizations of the whole set.
    - `batch_size`: images per call of `bits_per_dim` (None: all at once).
    - `options`: `bits_per_dim`'s options (`num_bins`, `data_range`, `trace`, `options=` or the
      solve keywords).
    """
    repeats = check_positive_int(repeats, "repeats")
    num_probes = check_positive_int(num_probes, "num_probes")
    x_int = np.asarray(x_int) if not isinstance(x_int, jax.Array) else x_int
    if x_int.ndim < 1 or x_int.shape[0] < 1:
        raise ValueError(f"x_int must have a leading batch axis, got shape {x_int.shape}")
    n = int(x_int.shape[0])
    batch_size = n if batch_size is None else check_positive_int(batch_size, "batch_size")
    results = []
    for r in range(repeats):
        key_r = jax.random.fold_in(key, r)
        batches = [
            bits_per_dim(model, sde, x_int[i : i + batch_size], key=jax.random.fold_in(key_r, i),
                         num_probes=num_probes, **options)
            for i in range(0, n, batch_size)
        ]
        if len(batches) == 1:
            results.append(batches[0])
        else:
            results.append(jax.tree_util.tree_map(lambda *a: np.concatenate(a), *batches))
    return BitsPerDimEvaluation(summary=summarize_bits_per_dim(results), results=tuple(results))
