"""Datasets from a user's numpy arrays and from an analytic Gaussian mixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._validate import check_num_bins
from ._dataset import Dataset, quantise


def _check_bins(num_bins) -> int:
    return check_num_bins(num_bins)


def _check_range(data_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi), got {data_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be (lo, hi) with finite hi > lo, got {data_range!r}")
    return lo, hi


def from_arrays(
    images,
    labels=None,
    *,
    num_bins: int,
    data_range: tuple[float, float] = (0.0, 1.0),
    name: str = "arrays",
    split: str = "train",
) -> Dataset:
    """A `Dataset` from integer arrays: `images` `[N, H, W, C]` (or `[N, D]` for vectors) with
    values in `[0, num_bins)`, `labels` `[N]` integers (None: all -1, "unlabelled").

    The model sees `lo + (hi - lo) (images + u) / num_bins`, `(lo, hi) = data_range`. Float
    data must be quantised first (e.g. `round(x * 255)` with `num_bins=256`). Raises ValueError
    naming the argument for a wrong rank, dtype or range.
    """
    num_bins = _check_bins(num_bins)
    data_range = _check_range(data_range)
    arr = np.asarray(images)
    if arr.ndim not in (2, 4):
        raise ValueError(
            f"images must have shape [N, H, W, C] (images, channels last) or [N, D] (vectors), "
            f"got shape {arr.shape} (rank {arr.ndim})"
        )
    if arr.shape[0] < 1 or arr.size == 0:
        raise ValueError(f"images must hold at least one non-empty example, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"images must be integers in [0, num_bins) = [0, {num_bins}), got dtype {arr.dtype}; "
            f"quantise float data first (e.g. np.round(x * 255) with num_bins=256)"
        )
    lo_v, hi_v = int(arr.min()), int(arr.max())
    if lo_v < 0 or hi_v >= num_bins:
        raise ValueError(
            f"images must be integers in [0, num_bins) = [0, {num_bins}), got values in "
            f"[{lo_v}, {hi_v}]"
        )
    if labels is None:
        lab = np.full((arr.shape[0],), -1, np.int32)
    else:
        lab = np.asarray(labels)
        if lab.shape != (arr.shape[0],):
            raise ValueError(f"labels must have shape [N] = ({arr.shape[0]},), got {lab.shape}")
        if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if not isinstance(name, str) or not isinstance(split, str):
        raise ValueError(f"name and split must be strings, got {name!r}, {split!r}")
    # int32 (JAX's default integer), not uint8: num_bins = 256 itself must be representable
    # where images are compared with it (e.g. bits_per_dim's range check).
    arr = arr.astype(np.int32)
    return Dataset(
        name=name,
        split=split,
        images=arr,
        labels=lab.astype(np.int32),
        num_bins=num_bins,
        data_range=data_range,
    )


def from_mixture(
    gm,
    n: int,
    *,
    key,
    num_bins: int = 256,
    data_range: tuple[float, float] | None = None,
    name: str = "mixture",
    split: str = "train",
) -> Dataset:
    """`n` draws of `gm.sample(key, n)` (a `pf.GaussianMixture`), quantised to `num_bins` bins.

    `images` `[n, D]`, `labels` the component each draw came from. `data_range` defaults to the
    box `[min_k (mu_k - 6 sigma_k), max_k (mu_k + 6 sigma_k)]` over components and coordinates,
    so that clipping is negligible; draws outside `data_range` are clipped to its edge bins.
    """
    import jax
    import jax.numpy as jnp

    from .._mixture import GaussianMixture

    if not isinstance(gm, GaussianMixture):
        raise ValueError(f"gm must be a probflow GaussianMixture, got {type(gm).__name__}")
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    num_bins = _check_bins(num_bins)
    if data_range is None:
        means = np.asarray(gm.means, np.float64)
        stds = np.sqrt(np.diagonal(np.asarray(gm.covs, np.float64), axis1=1, axis2=2))
        data_range = (float((means - 6 * stds).min()), float((means + 6 * stds).max()))
    data_range = _check_range(data_range)
    x = np.asarray(gm.sample(key, int(n)))
    # The components that gm.sample drew (its first split key; see GaussianMixture.sample).
    kc, _ = jax.random.split(key)
    comp = np.asarray(jax.random.categorical(kc, jnp.log(gm.weights), shape=(int(n),)))
    return Dataset(
        name=name,
        split=split,
        images=quantise(x, num_bins=num_bins, data_range=data_range),
        labels=comp.astype(np.int32),
        num_bins=num_bins,
        data_range=data_range,
    )


def load_npz(path, split: str = "train") -> Dataset:
    """A `Dataset` from a `.npz` file (`probflow.data.load("npz:PATH", split)`).

    The file holds `images` (integers `[N, H, W, C]` or `[N, D]`) and optionally `labels` `[N]`
    and `num_bins` (default 256, 8-bit images), or, one pair per split, `{split}_images` and
    `{split}_labels` (e.g. `train_images`, `test_images`). The data range is (0, 1); commands
    and functions that take a model map it to the model's range.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"npz:{path}: no such file (a .npz with an 'images' array)")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"npz:{path}: not a .npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # np.load reads .npy files too
        raise ValueError(
            f"npz:{path}: a .npy array, not a .npz archive; save one with "
            f"np.savez(path, images=..., labels=..., num_bins=...)"
        )
    with data:
        key = f"{split}_images" if f"{split}_images" in data else "images"
        if key == "images" and any(k.endswith("_images") for k in data.files):
            raise ValueError(f"npz:{path}: no split {split!r} (holds: {', '.join(data.files)})")
        if key not in data:
            raise ValueError(
                f"npz:{path}: no '{split}_images' or 'images' array (holds: "
                f"{', '.join(data.files)})"
            )
        labels_key = key.replace("images", "labels")
        try:
            images = data[key]
            labels = data[labels_key] if labels_key in data else None
            num_bins = data["num_bins"] if "num_bins" in data else 256
        except Exception as e:  # a damaged member
            raise ValueError(f"npz:{path}: cannot read its arrays ({e})") from None
    if isinstance(num_bins, np.ndarray) and (num_bins.shape != () or num_bins.dtype.kind
                                             not in "iu"):
        raise ValueError(
            f"npz:{path}: num_bins must be one integer, got an array of dtype {num_bins.dtype} "
            f"and shape {num_bins.shape}"
            + (f" ({num_bins.item()!r})" if num_bins.size == 1 else "")
        )
    try:
        return from_arrays(images, labels, num_bins=int(num_bins), name=f"npz:{path}",
                           split=split)
    except ValueError as e:
        raise ValueError(f"npz:{path}: {e}") from None
