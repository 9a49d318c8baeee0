"""Colour-tinted digits: offline colour data for colorization (issue: controllable generation).

Each 8x8 digit (levels 0..16) is tinted by one colour drawn per image from a fixed palette of
eight saturated hues: pixel = round(level * colour), colour in [0, 1]^3 with max channel 1, so the
images stay on 17 levels per channel, shape [N, 8, 8, 3], data range (0, 1). The same
train/test split as "digits". Grey (the channel mean) keeps the digit's shape; the colour is what
colorization must infer.
"""

from __future__ import annotations

import numpy as np

from ._dataset import Dataset
from ._digits import DIGITS_NUM_BINS, load_digits

#: The palette: red, green, blue, yellow, magenta, cyan, orange, violet.
PALETTE = np.array(
    [[1.0, 0.15, 0.15], [0.15, 1.0, 0.15], [0.2, 0.35, 1.0], [1.0, 0.9, 0.1],
     [1.0, 0.1, 0.9], [0.1, 0.95, 1.0], [1.0, 0.55, 0.05], [0.6, 0.2, 1.0]]
)
COLOR_SEED = 1


def load_digits_color(split: str) -> Dataset:
    """Digits tinted with a per-image palette colour (fixed seed), 17 levels per channel."""
    grey = load_digits(split)
    rng = np.random.default_rng(COLOR_SEED + {"train": 0, "test": 1, "all": 2}[split])
    colours = PALETTE[rng.integers(0, len(PALETTE), size=len(grey))]  # [N, 3]
    levels = np.asarray(grey.images, np.float64)  # [N, 8, 8, 1]
    images = np.rint(levels * colours[:, None, None, :]).astype(np.int32)
    images = np.clip(images, 0, DIGITS_NUM_BINS - 1)
    return Dataset(
        name="digits-color",
        split=split,
        images=images,
        labels=np.asarray(grey.labels),
        num_bins=DIGITS_NUM_BINS,
        data_range=(0.0, 1.0),
    )
