import hashlib
import json
import os
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._checkpoint import (
    MAGIC,
    _checkpoint_from_bytes,
    _training_state_from_bytes,
    load_training_state,
    read_checkpoint,
    write_atomically,
)
from probflow.models import MLP, AbstractScoreModel, UNet
from probflow.models._base import Dense


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    sde = pf.SubVPSDE(beta_min=0.2, beta_max=15.0)
    model = UNet(sde=sde, channels=(8, 16), key=jax.random.key(1))
    model = jax.tree.map(lambda a: a + 0.01 if isinstance(a, jax.Array) else a, model)
    path = tmp_path_factory.mktemp("ckpt") / "m.eqx"
    cfg = pf.TrainConfig(steps=7, lr=1e-3)
    pf.save_checkpoint(path, model, sde, cfg, step=7, num_bins=17, data_range=(0.0, 1.0),
                       data="digits")
    return path, model, sde


def test_roundtrip(saved):
    path, model, sde = saved
    m2, s2, cfg = pf.load_checkpoint(path)
    assert s2 == sde and type(m2) is UNet and m2.channels == (8, 16)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(m2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cfg["step"] == 7 and cfg["num_bins"] == 17 and cfg["data_range"] == (0.0, 1.0)
    assert cfg["lr"] == 1e-3 and cfg["steps"] == 7 and cfg["data"] == "digits"
    header, _, _ = read_checkpoint(path)
    assert header["model"]["class"] == "UNet" and header["sde"]["params"]["beta_max"] == 15.0
    assert header["format"] == "probflow" and header["kind"] == "score-model"
    assert m2.sde == s2  # the model's own SDE is the one returned
    assert set(header["versions"]) == {"probflow", "jax", "equinox"}
    mlp = MLP(2, sde=pf.VESDE(), width=8, depth=1, key=jax.random.key(0))
    p2 = path.with_name("mlp.eqx")
    pf.save_checkpoint(p2, mlp, pf.VESDE(), None)
    m3, _, _ = pf.load_checkpoint(p2)
    np.testing.assert_array_equal(
        np.asarray(m3(0.3, jnp.ones(2))), np.asarray(mlp(0.3, jnp.ones(2)))
    )


def test_missing_truncated_foreign_corrupted(saved, tmp_path):
    path, _, _ = saved
    with pytest.raises(pf.CheckpointError, match="not found: .*nope.eqx"):
        pf.load_checkpoint(tmp_path / "nope.eqx")
    blob = path.read_bytes()
    (n_header,) = struct.unpack("<Q", blob[len(MAGIC) : len(MAGIC) + 8])
    for cut in (5, len(MAGIC) + 4, len(MAGIC) + 8 + n_header // 2, len(blob) - 1):
        bad = tmp_path / f"cut{cut}.eqx"
        bad.write_bytes(blob[:cut])
        with pytest.raises(pf.CheckpointError, match=f"truncated.*cut{cut}.eqx"):
            pf.load_checkpoint(bad)
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.zeros(3))
    with pytest.raises(pf.CheckpointError, match="not a probflow checkpoint.*foreign.npy"):
        pf.load_checkpoint(foreign)
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    corrupt = tmp_path / "corrupt.eqx"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(pf.CheckpointError, match="checksum.*corrupt.eqx"):
        pf.load_checkpoint(corrupt)


def test_save_rejects_mismatched_sde_and_foreign_models(tmp_path):
    model = MLP(2, sde=pf.VPSDE(), width=8, depth=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="differs"):
        pf.save_checkpoint(tmp_path / "a.eqx", model, pf.VPSDE(beta_max=10.0), None)
    with pytest.raises(ValueError, match="score model"):
        pf.save_checkpoint(tmp_path / "a.eqx", lambda t, x: x, pf.VPSDE(), None)
    with pytest.raises(ValueError, match="JSON"):
        pf.save_checkpoint(tmp_path / "a.eqx", model, pf.VPSDE(), {"f": object()})
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_write_atomically_replaces_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "f.bin"
    write_atomically(p, b"old")
    write_atomically(p, b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("name", ["digits-vp", "digits-subvp"])
def test_pretrained_load(name):
    model, sde = pf.load_pretrained(name)
    assert isinstance(model, UNet) and model.shape == (8, 8, 1)
    assert type(sde) is {"digits-vp": pf.VPSDE, "digits-subvp": pf.SubVPSDE}[name]
    out = jax.jit(lambda x: model(0.5, x))(jnp.full((8, 8, 1), 0.3))
    assert np.all(np.isfinite(np.asarray(out)))
    header, _, _ = read_checkpoint(
        os.path.join(os.path.dirname(pf.__file__), "pretrained", f"{name}.eqx"))
    assert header["data"]["num_bins"] == 17 and header["data"]["data_range"] == [0.0, 1.0]
    assert os.path.getsize(os.path.join(os.path.dirname(pf.__file__), "pretrained",
                                        f"{name}.eqx")) < 10 * 2**20
    json.dumps(header)
    with pytest.raises(ValueError, match="unknown pretrained"):
        pf.load_pretrained("digits-ve")


# ---------------------------------------------------------------------------------------------
# Every byte is checksummed and every field checked (issue 11, section 4).


def _split(blob):
    (n,) = struct.unpack("<Q", blob[len(MAGIC) : len(MAGIC) + 8])
    head_end = len(MAGIC) + 8 + n
    return json.loads(blob[len(MAGIC) + 8 : head_end]), head_end


def _resign(blob, edit):
    """The file with its header edited by `edit` and a freshly computed header checksum."""
    header, head_end = _split(blob)
    edit(header)
    hb = json.dumps(header, sort_keys=True).encode()
    head = MAGIC + struct.pack("<Q", len(hb)) + hb
    return head + hashlib.sha256(head).digest() + blob[head_end + 32 :]


def _same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        type(x) is type(y) and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


_CLEAR = ("corrupted", "truncated", "not a probflow", "invalid", "checksum", "trailing",
          "does not match", "not valid JSON")


def flip_every_bit(path, tmp_path, load, load_bytes, same, payload_sample=256, via_files=64):
    """Flip every bit of the header region (magic, length, JSON, checksum) and a sample of payload
    bits; each load must raise a clear CheckpointError naming the file, or give back exactly the
    original. `load_bytes(blob, name)` is `load` of a file's contents (opening thousands of files
    is slow on some file systems); `via_files` of the flips, spread evenly, go through files."""
    blob = path.read_bytes()
    _, head_end = _split(blob)
    header_bits = range(8 * (head_end + 32))
    rng = np.random.default_rng(0)
    payload_bits = rng.choice(np.arange(8 * (head_end + 32), 8 * len(blob)),
                              min(payload_sample, 8 * (len(blob) - head_end - 32)), replace=False)
    bits = [*header_bits, *payload_bits.tolist()]
    by_file = set(bits[:: max(1, len(bits) // via_files)])
    bad = tmp_path / "flipped.eqx"
    outcomes = {"error": 0, "identical": 0}
    for bit in bits:
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            if bit in by_file:
                bad.write_bytes(bytes(flipped))
                loaded = load(bad)
            else:
                loaded = load_bytes(bytes(flipped), bad)
        except pf.CheckpointError as e:
            msg = str(e)
            assert msg.endswith(str(bad)) and any(w in msg for w in _CLEAR), (bit, msg)
            outcomes["error"] += 1
        else:
            assert same(loaded), f"bit {bit} loaded a different result"
            outcomes["identical"] += 1
    assert sum(outcomes.values()) == len(header_bits) + len(payload_bits)
    return outcomes


@pytest.fixture(scope="module")
def small_saved(tmp_path_factory):
    """A small model with a training state, so that the bit sweep is quick."""
    sde = pf.VPSDE(beta_min=0.2, beta_max=15.0)
    model = MLP(2, sde=sde, width=8, depth=1, sigma_data=0.5, key=jax.random.key(2))
    state = {"step": jnp.asarray(3), "ema": eqx.filter(model, eqx.is_inexact_array)}
    path = tmp_path_factory.mktemp("small") / "m.eqx"
    pf.save_checkpoint(path, model, sde, pf.TrainConfig(steps=7, lr=1e-3), step=7, num_bins=17,
                       data_range=(0.0, 1.0), data="digits", state=state)
    return path, model, sde, state


def test_every_header_bit_and_sampled_payload_bits(small_saved, tmp_path):
    path, model, sde, state = small_saved
    _, _, cfg = pf.load_checkpoint(path)

    def same(loaded):
        m, s, c = loaded
        return _same_tree(m, model) and s == sde and m.sde == sde and c == cfg

    outcomes = flip_every_bit(path, tmp_path, pf.load_checkpoint, _checkpoint_from_bytes, same)
    assert outcomes["error"] > 6000  # every bit of a ~900-byte header, and the payload sample
    like = {"step": jnp.asarray(0), "ema": eqx.filter(model, eqx.is_inexact_array)}
    flip_every_bit(path, tmp_path, lambda p: load_training_state(p, like)[1],
                   lambda b, p: _training_state_from_bytes(b, p, like)[1],
                   lambda st: _same_tree(st, state), payload_sample=512)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["sde"].update(params={}), "sde.params"),
        (lambda h: h["sde"].update({"class": "NoSuchSDE"}), "NoSuchSDE"),
        (lambda h: h["sde"]["params"].update(beta_max=35.0), "SDE .* differs"),
        (lambda h: h["sde"]["params"].update(beta_max="15"), "sde"),
        (lambda h: h["data"].update(num_bins="abc"), "data.num_bins"),
        (lambda h: h["data"].update(num_bins=1), "data.num_bins"),
        (lambda h: h["data"].update(data_range=[1.0, 0.0]), "data.data_range"),
        (lambda h: h["data"].update(data_range=[0.0]), "data.data_range"),
        (lambda h: h.update(step=-1), "step"),
        (lambda h: h.update(step=True), "step"),
        (lambda h: h.update(format="other"), "format"),
        (lambda h: h.update(format_version=1), "format_version"),
        (lambda h: h.update(kind="classifier"), "load_classifier"),
        (lambda h: h.pop("config"), "config"),
        (lambda h: h.pop("data"), "data"),
        (lambda h: h["model"].update({"class": "NoSuchNet"}), "NoSuchNet.*import the module"),
        (lambda h: h["model"]["hyperparameters"].update(width=16), "does not match"),
        (lambda h: h["model"]["hyperparameters"].update(sigma="x"), "hyperparameters"),
        (lambda h: h["payload"].update(model_sha256="0" * 64), "payload is corrupted"),
        (lambda h: h["payload"].update(model_bytes=-1), "model_bytes"),
        (lambda h: h.pop("payload"), "payload"),
    ],
)
def test_edited_headers_with_valid_checksums_are_rejected(small_saved, tmp_path, edit, match):
    path, *_ = small_saved
    bad = tmp_path / "edited.eqx"
    bad.write_bytes(_resign(path.read_bytes(), edit))
    with pytest.raises(pf.CheckpointError, match=f"{match}.*edited.eqx"):
        pf.load_checkpoint(bad)


def test_an_unedited_resigned_file_loads(small_saved, tmp_path):
    path, model, sde, _ = small_saved
    ok = tmp_path / "ok.eqx"
    ok.write_bytes(_resign(path.read_bytes(), lambda h: None))
    m, s, _ = pf.load_checkpoint(ok)
    assert _same_tree(m, model) and s == sde  # so the rejections above come from the edits


def test_old_format_is_named(small_saved, tmp_path):
    old = tmp_path / "old.eqx"
    old.write_bytes(b"PROBFLOW-CKPT-1\n" + path_bytes(small_saved)[len(MAGIC):])
    with pytest.raises(pf.CheckpointError, match="old file format 1.*convert_checkpoints"):
        pf.load_checkpoint(old)


def path_bytes(saved):
    return saved[0].read_bytes()


# ---------------------------------------------------------------------------------------------
# Users' own score models can be saved (no closed registry of classes).

CONSTRUCTED_UNDER_TRACE = []


class QuadraticNet(AbstractScoreModel):
    """A user's model: not a class that probflow ships."""

    sde: pf.AbstractSDE
    shape: tuple[int, ...] = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    layer: Dense
    mix: jax.Array

    def __init__(self, shape, *, sde, hidden=4, sigma_data=1.0, key):
        self.sde, self.shape = sde, tuple(shape)
        self.sigma_data, self.hidden = float(sigma_data), int(hidden)
        d = int(np.prod(self.shape))
        k1, k2 = jax.random.split(key)
        self.layer = Dense(d + 1, hidden, key=k1)
        self.mix = jax.random.normal(k2, (hidden, d))
        CONSTRUCTED_UNDER_TRACE.append(isinstance(self.mix, jax.core.Tracer))

    @property
    def hyperparameters(self):
        return {"shape": list(self.shape), "hidden": self.hidden, "sigma_data": self.sigma_data}

    def network(self, c_noise, x, *, key):
        h = self.layer(jnp.concatenate([x.ravel(), c_noise[None]]))
        return (h**2 @ self.mix).reshape(self.shape)


def test_users_own_model_roundtrips(tmp_path):
    sde = pf.VESDE(sigma_min=0.02, sigma_max=10.0)
    model = QuadraticNet((2, 3), sde=sde, hidden=5, sigma_data=0.7, key=jax.random.key(4))
    pf.save_checkpoint(tmp_path / "q.eqx", model, sde)
    CONSTRUCTED_UNDER_TRACE.clear()
    m2, s2, _ = pf.load_checkpoint(tmp_path / "q.eqx")
    assert CONSTRUCTED_UNDER_TRACE == [True]  # a shape-only skeleton: no arrays initialised
    assert type(m2) is QuadraticNet and m2.hidden == 5 and m2.sigma_data == 0.7 and s2 == sde
    x = jax.random.normal(jax.random.key(5), (2, 3))
    np.testing.assert_array_equal(np.asarray(m2(0.4, x)), np.asarray(model(0.4, x)))


def test_save_rejects_classes_defined_in_functions(tmp_path):
    class Local(QuadraticNet):
        pass

    model = Local((2,), sde=pf.VPSDE(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="module level"):
        pf.save_checkpoint(tmp_path / "l.eqx", model, pf.VPSDE())
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Shipped models: converted to the current format with their weights unchanged.

# m(t, x) for x = jax.random.uniform(key(0), shape), recorded from the format-1 files before the
# conversion: (sum of the output in float64, its first two entries). Recorded on one CPU: XLA's
# convolutions round differently with another instruction set (2.5e-7 relative seen with AVX-512
# against AVX2), so the check is at float32 rounding through the network (1e-5 relative, about
# 80 ulps); the checksum tests above catch any changed byte of the files themselves.
RECORDED = {
    ("digits-vp", 1e-5): (-9878.06270775199, [-1707.6158447265625, -485.2907409667969]),
    ("digits-vp", 0.3): (-31.926072902977467, [-1.4983657598495483, -1.5100167989730835]),
    ("digits-subvp", 0.9): (-33.698880445212126, [-0.9448336958885193, -0.9687254428863525]),
    ("digits-color-vp", 0.3): (-106.47355738794431, [-1.847401738166809, -1.8226724863052368]),
}


@pytest.mark.parametrize("name, t", list(RECORDED), ids=[f"{n}-{t}" for n, t in RECORDED])
def test_pretrained_outputs_unchanged_by_the_conversion(name, t):
    model, sde = pf.load_pretrained(name)
    assert model.sde == sde
    out = np.asarray(model(t, jax.random.uniform(jax.random.key(0), model.shape)), np.float64)
    total, first = RECORDED[name, t]
    np.testing.assert_allclose(out.sum(), total, rtol=1e-5)
    np.testing.assert_allclose(out.ravel()[:2], first, rtol=1e-5)


@pytest.mark.usefixtures("x64")
def test_pretrained_loads_with_x64():
    model, sde = pf.load_pretrained("digits-vp")
    assert model.conv_in.weight.dtype == jnp.float64  # cast exactly from the stored float32
    x = jax.random.uniform(jax.random.key(0), model.shape, dtype=jnp.float32)
    out = np.asarray(model(0.3, x.astype(jnp.float64)))
    total, _ = RECORDED["digits-vp", 0.3]
    np.testing.assert_allclose(out.sum(), total, rtol=1e-4)
    clf = pf.load_pretrained_classifier("digits-vp-classifier")
    assert clf.head.weight.dtype == jnp.float64
