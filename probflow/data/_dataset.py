"""The dataset record that every source returns."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._validate import check_num_bins


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dataset:
    """Quantised images with their labels.

    `images` are integers in `[0, num_bins)`, shape `[N, H, W, C]` (channels last) for images or
    `[N, D]` for low-dimensional data (2-d toys, mixtures: one example is a vector); the model
    sees them as `x = lo + (hi - lo) * (images + u) / num_bins`, `(lo, hi) = data_range`, with
    `u ~ U[0, 1)` (uniform dequantization).
    """

    name: str
    split: str
    images: Array | np.ndarray
    labels: Array | np.ndarray
    num_bins: int
    data_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        images = jnp.asarray(self.images)
        labels = jnp.asarray(self.labels)
        if images.ndim not in (2, 4):
            raise ValueError(
                f"images must have shape [N, H, W, C] (or [N, D] for vectors), got shape "
                f"{images.shape}"
            )
        if not jnp.issubdtype(images.dtype, jnp.integer):
            raise ValueError(f"images must be integers in [0, num_bins), got dtype {images.dtype}")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must have shape [N] = {images.shape[:1]}, got shape {labels.shape}"
            )
        num_bins = check_num_bins(self.num_bins)
        if images.size:
            host = np.asarray(self.images)  # on the host: no program to compile for it
            low, high = int(host.min()), int(host.max())
            if low < 0 or high >= num_bins:
                raise ValueError(
                    f"images must be levels in [0, num_bins) = [0, {num_bins}), got values in "
                    f"[{low}, {high}]"
                )
        try:
            lo, hi = (float(v) for v in self.data_range)
        except (TypeError, ValueError):
            raise ValueError(f"data_range must be a pair (lo, hi), got {self.data_range!r}"
                             ) from None
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(
                f"data_range must be (lo, hi) with finite hi > lo, got {self.data_range!r}"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "num_bins", num_bins)
        object.__setattr__(self, "data_range", (lo, hi))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example, `(H, W, C)` (or `(D,)` for vectors)."""
        return tuple(self.images.shape[1:])

    def take(self, indices, *, split: str | None = None) -> Dataset:
        """The examples at `indices` (an int array or a slice)."""
        idx = np.asarray(indices) if not isinstance(indices, slice) else indices
        return dataclasses.replace(
            self,
            split=self.split if split is None else split,
            images=self.images[idx],
            labels=self.labels[idx],
        )

    def hold_out(self, num: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split off `num` examples, chosen by a fixed permutation with `seed`, for validation.

        Returns `(rest, held_out)`; the same `(num, seed)` always gives the same split.
        """
        n = len(self)
        if not (isinstance(num, int) and 0 < num < n):
            raise ValueError(f"num must be an int in (0, {n}), got {num!r}")
        perm = np.random.default_rng(seed).permutation(n)
        rest = self.take(np.sort(perm[num:]), split=f"{self.split}-rest")
        held = self.take(np.sort(perm[:num]), split=f"{self.split}-heldout")
        return rest, held

    def to_model_space(self, u=None) -> Array:
        """Images mapped to model space; `u` the dequantization noise (0.5 when None)."""
        levels = self.images.astype(jnp.result_type(float))
        return to_model_space(levels, 0.5 if u is None else u, self.num_bins, self.data_range)


def to_model_space(levels, u, num_bins: int, data_range) -> Array:
    """The one quantisation map: levels in [0, num_bins) (as floats) plus dequantization noise u
    to model space, lo + (hi - lo) (levels + u) / num_bins with (lo, hi) = data_range."""
    lo, hi = data_range
    return lo + (hi - lo) * (levels + u) / num_bins


def quantise(y, *, num_bins: int, data_range: tuple[float, float]) -> np.ndarray:
    """The inverse of `to_model_space` (u = 0): the level `floor((y - lo) / (hi - lo) *
    num_bins)` of each value, clipped to `[0, num_bins)`, as int32."""
    lo, hi = data_range
    k = np.floor((np.asarray(y, np.float64) - lo) / (hi - lo) * num_bins)
    return np.clip(k, 0, num_bins - 1).astype(np.int32)


def split_indices(n: int, num_test: int, seed: int, split: str, name: str) -> np.ndarray:
    """Indices of `split` in a fixed split of `n` examples: `default_rng(seed).permutation(n)`,
    its first `n - num_test` entries for "train", the rest for "test"; "all" is every example."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n - num_test
    if split == "train":
        return perm[:n_train]
    if split == "test":
        return perm[n_train:]
    if split == "all":
        return np.arange(n)
    raise ValueError(f"split for {name!r} must be 'train', 'test' or 'all', got {split!r}")
