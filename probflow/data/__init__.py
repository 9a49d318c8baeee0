"""Datasets: `probflow.data.load(name, split)` returns a `Dataset` of quantised images.

Each source is a function `split -> Dataset` in the `_SOURCES` table below (or a prefix such as
"tfds:" handled in `load`); adding a source means writing one such function. `from_arrays` and
`from_mixture` build a `Dataset` from a user's arrays or from an analytic Gaussian mixture.
"""

from __future__ import annotations

from collections.abc import Callable

from ._arrays import from_arrays as from_arrays
from ._arrays import from_mixture as from_mixture
from ._arrays import load_npz
from ._color import load_digits_color
from ._dataset import Dataset as Dataset
from ._digits import DIGITS_NUM_BINS as DIGITS_NUM_BINS
from ._digits import DIGITS_NUM_TEST as DIGITS_NUM_TEST
from ._digits import DIGITS_SEED as DIGITS_SEED
from ._digits import load_digits
from ._mnist import MNIST5K_NUM_TEST as MNIST5K_NUM_TEST
from ._mnist import MNIST5K_SEED as MNIST5K_SEED
from ._mnist import load_mnist5k
from ._tfds import DatasetNotPreparedError as DatasetNotPreparedError
from ._toy import TOY_DATA_RANGE as TOY_DATA_RANGE
from ._toy import TOY_GENERATORS, load_toy

_SOURCES: dict[str, Callable[[str], Dataset]] = {
    "digits": load_digits,
    "digits-color": load_digits_color,
    "mnist-5k": load_mnist5k,
    **{f"toy:{kind}": (lambda split, kind=kind: load_toy(kind, split)) for kind in TOY_GENERATORS},
}


def names() -> list[str]:
    """The dataset names that `load` knows (besides the prefixes "tfds:NAME" and "npz:PATH")."""
    return sorted(_SOURCES)


def load(name: str, split: str = "train", *, data_dir=None) -> Dataset:
    """Load dataset `name` ("digits", "mnist-5k", "toy:two-moons", "tfds:NAME", "npz:PATH",
    ...) and `split` ("train" or "test"; tfds split strings for "tfds:NAME"; for "npz:PATH" see
    `load_npz`).

    `data_dir`: where prepared tensorflow-datasets data live (default: `TFDS_DATA_DIR` or
    ~/tensorflow_datasets); only used by "tfds:NAME", which never downloads.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a dataset name (a str), got {name!r}")
    if name.startswith("tfds:"):
        from ._tfds import load_tfds

        return load_tfds(name[len("tfds:") :], split, data_dir=data_dir)
    if name.startswith("npz:"):
        return load_npz(name[len("npz:") :], split)
    try:
        source = _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known names: {', '.join(names())}") from None
    return source(split)
