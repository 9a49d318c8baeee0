"""Datasets: `probflow.data.load(name, split)` returns a `Dataset` of quantised images.

Each source is a function `split -> Dataset` in the `_SOURCES` table below (or a prefix such as
"tfds:" handled in `load`); adding a source means writing one such function.
"""

from __future__ import annotations

from collections.abc import Callable

from ._dataset import Dataset as Dataset
from ._digits import DIGITS_NUM_BINS as DIGITS_NUM_BINS
from ._digits import DIGITS_NUM_TEST as DIGITS_NUM_TEST
from ._digits import DIGITS_SEED as DIGITS_SEED
from ._digits import load_digits

_SOURCES: dict[str, Callable[[str], Dataset]] = {
    "digits": load_digits,
}


def names() -> list[str]:
    """The dataset names that `load` knows (besides prefixes such as "tfds:NAME")."""
    return sorted(_SOURCES)


def load(name: str, split: str = "train") -> Dataset:
    """Load dataset `name` ("digits", ...) and `split` ("train" or "test")."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a dataset name (a str), got {name!r}")
    if name.startswith("tfds:"):
        raise ValueError(
            f"dataset {name!r}: tensorflow-datasets sources are not available in this version; "
            f"known names: {', '.join(names())}"
        )
    try:
        source = _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known names: {', '.join(names())}") from None
    return source(split)
