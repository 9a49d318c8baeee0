import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._checkpoint import MAGIC, read_checkpoint, write_atomically
from probflow.models import MLP, UNet


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
