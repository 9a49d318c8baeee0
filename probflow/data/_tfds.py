"""tensorflow-datasets sources ("tfds:NAME"), read from local array_record data only.

`tfds.data_source(NAME, split=..., data_dir=..., download=False)` gives random access to data
that the user prepared beforehand (docs/data.md says how); nothing is ever downloaded, so a
missing dataset fails at once with instructions instead of waiting on network retries.
tensorflow-datasets is imported lazily (it is slow to import) and TensorFlow is not needed to
read prepared data.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np

from ._dataset import Dataset

_READ_CHUNK = 1024


class DatasetNotPreparedError(ValueError):
    """A tensorflow-datasets dataset is not prepared in the data directory."""


def _prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"prepare it on a machine with internet access (and TensorFlow, which tfds needs to "
        f"build most datasets): `tfds build {name} --file_format=array_record "
        f"--data_dir {data_dir}` (or in Python `tfds.builder('{name}', data_dir='{data_dir}', "
        f"file_format='array_record').download_and_prepare()`), copy that directory here, and "
        f"point probflow at it with --data-dir DIR (Python: data_dir=DIR) or TFDS_DATA_DIR=DIR"
    )


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(
            "'tfds:NAME' datasets need tensorflow-datasets and array_record; install them with "
            "`pip install tensorflow-datasets array_record` (or `pip install 'probflow[data]'`)"
        ) from None
    return tfds


def _data_dir_text(data_dir) -> str:
    if data_dir is not None:
        return str(data_dir)
    return os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    )


@contextlib.contextmanager
def _quiet_absl():
    """tfds logs absl warnings (e.g. "Variant folder ... has no dataset_info.json") for a missing
    dataset; our error says it better, so they are silenced while we probe."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _pick_features(example, name: str) -> tuple[str, str | None]:
    if not isinstance(example, dict):
        raise ValueError(
            f"tfds:{name}: examples are {type(example).__name__}, not dicts of features; "
            f"probflow needs an integer image feature"
        )
    arrays = {k: np.asarray(v) for k, v in example.items()}
    is_image = lambda a: a.ndim in (2, 3) and np.issubdtype(a.dtype, np.integer)
    if "image" in arrays and is_image(arrays["image"]):
        image_key = "image"
    else:
        candidates = [k for k, a in arrays.items() if is_image(a)]
        if not candidates:
            desc = ", ".join(f"{k}: {a.dtype}{list(a.shape)}" for k, a in arrays.items())
            raise ValueError(
                f"tfds:{name} has no integer image feature [H, W] or [H, W, C] (features: {desc})"
            )
        image_key = candidates[0]
    label_key = None
    if "label" in arrays and arrays["label"].ndim == 0:
        label_key = "label"
    return image_key, label_key


def load_tfds(name: str, split: str, *, data_dir=None) -> Dataset:
    """Dataset `name` (a tensorflow-datasets name, e.g. "mnist", "cifar10") and `split` (any
    tfds split string: "train", "test", "train[:90%]", ...), read whole into memory.

    `images` are int32 (`num_bins` = 2^bits of the feature's dtype: 256 for uint8 images);
    grey images `[H, W]` get a channel axis; `labels` are the
    "label" feature, or -1 when there is none. `data_dir` defaults to tfds's own default
    (`TFDS_DATA_DIR` or ~/tensorflow_datasets).
    """
    with _quiet_absl():
        return _load_tfds(name, split, data_dir=data_dir)


def _load_tfds(name: str, split: str, *, data_dir=None) -> Dataset:
    if not name or not isinstance(name, str):
        raise ValueError("dataset 'tfds:NAME' needs a NAME, e.g. 'tfds:mnist'")
    if data_dir is not None:
        data_dir = os.fspath(os.path.expanduser(os.fspath(data_dir)))
    where = _data_dir_text(data_dir)
    if not os.path.isdir(where):
        # Checked before importing tensorflow-datasets (about a second): the common case of a
        # machine without any prepared data fails at once.
        raise DatasetNotPreparedError(
            f"tfds:{name}: the data directory {where} does not exist, so no tensorflow-datasets "
            f"data are prepared there; " + _prepare_hint(name, where)
        )
    tfds = _import_tfds()
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown tensorflow-datasets dataset {name!r}: no such dataset is registered "
            f"with tfds and none is prepared in {where} (see `tfds.list_builders()` for the "
            f"catalogue)"
        ) from None
    except Exception as e:  # not prepared, prepared in another format, unknown split, ...
        try:
            prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
        except Exception:
            prepared = False
        if not prepared:
            raise DatasetNotPreparedError(
                f"tensorflow-datasets dataset {name!r} is not prepared in {where} (probflow "
                f"reads local array_record data and never downloads); "
                + _prepare_hint(name, where)
            ) from None
        raise ValueError(f"tfds:{name} (split {split!r}, data_dir {where}): {e}") from None
    n = len(source)
    if n == 0:
        raise ValueError(f"tfds:{name}: split {split!r} is empty")
    image_key, label_key = _pick_features(source[0], name)
    images, labels = [], []
    for start in range(0, n, _READ_CHUNK):
        chunk = [source[i] for i in range(start, min(n, start + _READ_CHUNK))]
        images.append(np.stack([np.asarray(ex[image_key]) for ex in chunk]))
        if label_key is not None:
            labels.append(np.asarray([ex[label_key] for ex in chunk]))
    arr = np.concatenate(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.dtype.itemsize <= 2:
        # int32, not uint8: num_bins = 256 itself must be representable where images are
        # compared with it (e.g. bits_per_dim's range check)
        num_bins = 2 ** (8 * arr.dtype.itemsize)
        arr = arr.astype(np.int32)
    else:
        raise ValueError(
            f"tfds:{name}: feature {image_key!r} has dtype {arr.dtype}; probflow reads 8- or "
            f"16-bit unsigned images"
        )
    lab = np.concatenate(labels).astype(np.int32) if labels else np.full((n,), -1, np.int32)
    return Dataset(
        name=f"tfds:{name}",
        split=split,
        images=arr,
        labels=lab,
        num_bins=num_bins,
        data_range=(0.0, 1.0),
    )
