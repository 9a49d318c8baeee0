import numpy as np
import pytest
from sklearn.datasets import load_digits

import probflow as pf
import probflow.data


def test_digits_split_is_the_documented_permutation():
    bunch = load_digits()
    ref_images = bunch.images.astype(np.int64)
    perm = np.random.default_rng(0).permutation(1797)  # documented in docs/training.md
    train = pf.data.load("digits", split="train")
    test = pf.data.load("digits", split="test")
    assert train.images.shape == (1497, 8, 8, 1) and test.images.shape == (300, 8, 8, 1)
    assert np.issubdtype(train.images.dtype, np.integer)
    np.testing.assert_array_equal(np.asarray(train.images)[..., 0], ref_images[perm[:1497]])
    np.testing.assert_array_equal(np.asarray(test.images)[..., 0], ref_images[perm[1497:]])
    np.testing.assert_array_equal(np.asarray(test.labels), bunch.target[perm[1497:]])
    assert train.num_bins == test.num_bins == 17
    assert train.data_range == (0.0, 1.0)
    assert int(train.images.min()) == 0 and int(train.images.max()) == 16


def test_digits_read_without_sklearn_equals_its_loader(monkeypatch):
    """The file is read directly (no scikit-learn import); its own loader is the fallback."""
    from probflow.data import _digits

    assert _digits._digits_file() is not None
    direct = _digits._digits_arrays()
    monkeypatch.setattr(_digits, "_digits_file", lambda: None)
    _digits._digits_arrays.cache_clear()
    try:
        fallback = _digits._digits_arrays()
    finally:
        _digits._digits_arrays.cache_clear()
    bunch = load_digits()
    for got in (direct, fallback):
        np.testing.assert_array_equal(got[0][..., 0], bunch.images.astype(np.int32))
        np.testing.assert_array_equal(got[1], bunch.target)
        assert got[0].dtype == got[1].dtype == np.int32


def test_hold_out_is_deterministic_and_disjoint():
    train = pf.data.load("digits", split="train")
    rest, held = train.hold_out(200, seed=0)
    rest2, held2 = train.hold_out(200, seed=0)
    assert len(rest) == 1297 and len(held) == 200
    np.testing.assert_array_equal(np.asarray(held.images), np.asarray(held2.images))
    # Together they are the training split, each image exactly once.
    both = np.concatenate([np.asarray(rest.images), np.asarray(held.images)]).reshape(1497, -1)
    ref = np.asarray(train.images).reshape(1497, -1)
    key = lambda a: sorted(map(bytes, a.astype(np.int8)))
    assert key(both) == key(ref)
    _, other = train.hold_out(200, seed=1)
    assert not np.array_equal(np.asarray(other.images), np.asarray(held.images))


def test_model_space_map():
    ds = pf.data.load("digits", split="test")
    x = np.asarray(ds.to_model_space())
    np.testing.assert_allclose(x, (np.asarray(ds.images) + 0.5) / 17, rtol=1e-6)


@pytest.mark.parametrize(
    "name, split, match",
    [("nope", "train", "unknown dataset 'nope'"), ("digits", "valid", "split"),
     ("tfds:mnist", "train", "tfds")],
)
def test_bad_names(name, split, match):
    with pytest.raises(ValueError, match=match):
        pf.data.load(name, split)


def test_dataset_validates():
    with pytest.raises(ValueError, match="integers"):
        pf.data.Dataset(name="x", split="t", images=np.zeros((2, 2, 2, 1)),
                        labels=np.zeros(2), num_bins=4)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        pf.data.Dataset(name="x", split="t", images=np.zeros((2, 2, 2), int),
                        labels=np.zeros(2), num_bins=4)
