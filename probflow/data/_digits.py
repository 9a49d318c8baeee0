"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1,797 images)."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ._dataset import Dataset, split_indices

#: The digits split: `numpy.random.default_rng(DIGITS_SEED).permutation(1797)`; its first 1,497
#: entries index the training images, its last 300 the test images.
DIGITS_SEED = 0
DIGITS_NUM_TEST = 300
DIGITS_NUM_BINS = 17  # pixel values 0..16


def _digits_file() -> Path | None:
    """scikit-learn's `datasets/data/digits.csv.gz` (64 pixels then the label per row), found
    without importing scikit-learn (which takes longer than the rest of a warm `probflow bpd`)."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _digits_file()
    if path is not None:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",")
        pixels, target = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1]
    else:  # another layout of the package: its own loader
        from sklearn.datasets import load_digits

        bunch: Any = load_digits()
        pixels, target = bunch.images, bunch.target
    images = np.asarray(pixels).round().astype(np.int32)[..., None]  # [1797, 8, 8, 1]
    labels = np.asarray(target).astype(np.int32)
    return images, labels


def load_digits(split: str) -> Dataset:
    """The fixed train (1,497) / test (300) split of the 8x8 digits, 17 levels, range (0, 1)."""
    images, labels = _digits_arrays()
    idx = split_indices(images.shape[0], DIGITS_NUM_TEST, DIGITS_SEED, split, "digits")
    return Dataset(
        name="digits",
        split=split,
        images=images[idx],
        labels=labels[idx],
        num_bins=DIGITS_NUM_BINS,
        data_range=(0.0, 1.0),
    )
