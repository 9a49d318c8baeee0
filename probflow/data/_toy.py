"""2-d toy distributions ("toy:two-moons", "toy:rings", "toy:checkerboard", "toy:8gaussians"),
generated deterministically from a seed and quantised like images.

Each example is a vector `[2]` (a `Dataset` of shape `[N, 2]`). The continuous draws `y` are
quantised to `k = floor((y - lo) / (hi - lo) * num_bins)`, clipped to `[0, num_bins)`, with
`(lo, hi) = TOY_DATA_RANGE` and `num_bins = TOY_NUM_BINS`; the model sees
`lo + (hi - lo) (k + u) / num_bins`, `u ~ U[0, 1)`, so the dequantised data are the draws up to a
bin of width 8 / 256 = 0.03125. The train split uses seed `TOY_SEEDS["train"]` and
`TOY_NUM_TRAIN` points; the test split an independent seed and `TOY_NUM_TEST` points.
"""

from __future__ import annotations

import numpy as np

from ._dataset import Dataset, quantise

TOY_DATA_RANGE = (-4.0, 4.0)
TOY_NUM_BINS = 256
TOY_NUM_TRAIN = 10_000
TOY_NUM_TEST = 2_000
TOY_SEEDS = {"train": 0, "test": 1}


def _two_moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    theta = rng.uniform(0.0, np.pi, n)
    upper = np.stack([np.cos(theta), np.sin(theta)], -1)
    lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], -1)
    y = np.where(labels[:, None] == 0, upper, lower) + 0.1 * rng.standard_normal((n, 2))
    return 2.0 * (y - np.array([0.5, 0.25])), labels  # centred, in about [-3, 3] x [-1.7, 1.7]


def _rings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 3, n)  # radii 1, 2, 3
    theta = rng.uniform(0.0, 2 * np.pi, n)
    r = (labels + 1.0) + 0.08 * rng.standard_normal(n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], -1), labels


def _checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # The 4x4 checkerboard on [-2, 2]^2 of Grathwohl et al. (FFJORD): 8 occupied unit squares.
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    y = np.stack([x1, x2], -1)
    labels = ((np.floor(x1) + 2) * 4 + (np.floor(x2) + 2)).astype(np.int64)  # the square's index
    return y, labels


def _eight_gaussians(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 8, n)
    angle = labels * (np.pi / 4)
    centres = 2.5 * np.stack([np.cos(angle), np.sin(angle)], -1)
    return centres + 0.2 * rng.standard_normal((n, 2)), labels


TOY_GENERATORS = {
    "two-moons": _two_moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
}




def toy_draws(kind: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The continuous draws `[N, 2]` and labels of a toy set, before quantisation."""
    if kind not in TOY_GENERATORS:
        raise ValueError(
            f"unknown toy dataset 'toy:{kind}'; known: "
            + ", ".join(f"toy:{k}" for k in TOY_GENERATORS)
        )
    if split not in TOY_SEEDS:
        raise ValueError(f"split for 'toy:{kind}' must be 'train' or 'test', got {split!r}")
    n = TOY_NUM_TRAIN if split == "train" else TOY_NUM_TEST
    # One stream per (set, split): the seed and the set's index, so sets differ from each other.
    index = list(TOY_GENERATORS).index(kind)
    rng = np.random.default_rng([TOY_SEEDS[split], index])
    return TOY_GENERATORS[kind](rng, n)


def load_toy(kind: str, split: str) -> Dataset:
    y, labels = toy_draws(kind, split)
    return Dataset(
        name=f"toy:{kind}",
        split=split,
        images=quantise(y, num_bins=TOY_NUM_BINS, data_range=TOY_DATA_RANGE),
        labels=labels.astype(np.int32),
        num_bins=TOY_NUM_BINS,
        data_range=TOY_DATA_RANGE,
    )
