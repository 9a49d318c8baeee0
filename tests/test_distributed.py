"""Data-parallel training: 2 forced CPU devices give the single-device result."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow import _distributed
from probflow.models import MLP

# Runs in a fresh interpreter: XLA_FLAGS must be set before jax is imported.
_SCRIPT = r"""
import json, sys
import equinox as eqx, jax, numpy as np
import probflow as pf
from probflow.models import MLP

assert jax.device_count() == 2, jax.devices()
sde = pf.VPSDE()
ds = pf.data.load("toy:two-moons", "train")
model = MLP(2, sde=sde, width=64, depth=2, key=jax.random.key(0))
leaves = lambda m: [np.asarray(x) for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))]
out = {}
for steps, spc in [(2, 1), (6, 3)]:  # step 0 has lr 0 (warm-up from 0)
    cfg = pf.TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup=2, steps_per_call=spc,
                         checkpoint_every=100, seed=1)
    one = pf.train(model, sde, ds, cfg, progress=False)
    run_dir = sys.argv[1] + f"/run{steps}"
    two = pf.train(model, sde, ds, cfg, progress=False, devices=2, out=run_dir)
    a, b, init = leaves(one.raw_model), leaves(two.raw_model), leaves(model)
    ema_a, ema_b = leaves(one.model), leaves(two.model)
    saved, _, _ = pf.load_checkpoint(run_dir + "/checkpoint.eqx")
    out[steps] = {
        "max_diff": max(float(np.abs(x - y).max()) for x, y in zip(a, b)),
        "max_ema_diff": max(float(np.abs(x - y).max()) for x, y in zip(ema_a, ema_b)),
        "max_change": max(float(np.abs(x - y).max()) for x, y in zip(a, init)),
        "loss_diff": float(np.abs(one.losses - two.losses).max()),
        "saved_diff": max(float(np.abs(x - y).max()) for x, y in zip(leaves(saved), ema_b)),
        "num_devices": len(jax.tree.leaves(eqx.filter(two.raw_model,
                                                      eqx.is_inexact_array))[0].sharding.device_set),
    }
try:
    pf.train(model, sde, ds, pf.TrainConfig(steps=1, batch_size=63), progress=False, devices=2)
except ValueError as e:
    out["odd_batch"] = str(e)
print(json.dumps(out))
"""


def test_two_forced_cpu_devices_train_like_one(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for steps in ("2", "6"):
        r = res[steps]
        assert r["num_devices"] == 2  # the parameters really live on both devices
        assert r["max_change"] > 1e-4  # training moved the parameters (Adam: ~lr per step) ...
        assert r["max_diff"] < 1e-6  # ... identically up to float32 round-off
        assert r["max_ema_diff"] < 1e-6 and r["loss_diff"] < 1e-5
        assert r["saved_diff"] == 0.0  # the checkpoint holds the EMA that train returned
    assert "batch_size must be divisible by the number of devices (2)" in res["odd_batch"]


def test_more_devices_than_exist_is_a_clear_error():
    sde = pf.VPSDE()
    model = MLP(2, sde=sde, width=8, depth=1, key=jax.random.key(0))
    data = np.zeros((8, 2), np.float32)
    cfg = pf.TrainConfig(steps=1, batch_size=4)
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"devices={n + 1} requested but only {n} CPU"):
        pf.train(model, sde, data, cfg, progress=False, devices=n + 1)
    with pytest.raises(ValueError, match="devices must be a positive int"):
        pf.train(model, sde, data, cfg, progress=False, devices=0)
    d = jax.devices()[0]
    with pytest.raises(ValueError, match="must not repeat"):
        pf.train(model, sde, data, cfg, progress=False, devices=[d, d])


def test_cli_devices_error_is_one_line(tmp_path, capsys):
    from probflow._cli import main

    n = jax.device_count()
    rc = main(["train", "--data", "toy:rings", "--sde", "vp", "--steps", "2", "--model", "mlp",
               "--out", str(tmp_path / "run"), "--devices", str(n + 3)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--devices: devices={n + 3} requested but only {n}" in err
    assert "xla_force_host_platform_device_count" in err
    assert not (tmp_path / "run").exists()


def test_initialize_distributed_checks_its_arguments():
    # All checks run before jax.distributed.initialize is called (nothing is started).
    with pytest.raises(ValueError, match="must be given together"):
        pf.initialize_distributed("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="coordinator must be HOST:PORT, got '127.0.0.1'"):
        pf.initialize_distributed("127.0.0.1", 2, 0)
    with pytest.raises(ValueError, match=r"process_id must be an int in \[0, num_processes=2\)"):
        pf.initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
        pf.initialize_distributed("127.0.0.1:1234", 0, 0)


def test_distributed_bits_per_dim_on_one_process_is_the_batched_loop(monkeypatch):
    """With one process: image i draws from fold_in(key, i), the results in example order;
    checked against pf.bits_per_dim called batch by batch with those keys. The draws do not
    depend on the batch size, and a process left without batches returns empty fields."""
    sde = pf.VPSDE()
    model = MLP(2, sde=sde, width=8, depth=1, key=jax.random.key(0))
    ds = pf.data.load("toy:two-moons", "test")
    x, key = ds.images[:5], jax.random.key(7)
    opts = dict(num_bins=ds.num_bins, data_range=ds.data_range, rtol=1e-3, atol=1e-3)
    got = pf.distributed_bits_per_dim(model, sde, x, key=key, batch_size=2, **opts)
    keys = jnp.stack([jax.random.fold_in(key, i) for i in range(5)])
    ref = [pf.bits_per_dim(model, sde, x[s : s + 2], key=keys[s : s + 2], **opts)
           for s in (0, 2, 4)]
    np.testing.assert_array_equal(np.asarray(got.bpd), np.concatenate([r.bpd for r in ref]))
    np.testing.assert_array_equal(np.asarray(got.nfe), np.concatenate([r.nfe for r in ref]))
    assert got.bpd_probes.shape == (5, 1) and got.z.shape == (5, 2)
    # One batch of 5: the same draws, so the same values up to the solver's tolerance (a batch
    # of another size rounds the network's last bits differently, which can move a step).
    whole = pf.distributed_bits_per_dim(model, sde, x, key=key, batch_size=5, **opts)
    np.testing.assert_allclose(np.asarray(whole.bpd), np.asarray(got.bpd), rtol=0, atol=1e-3)
    # A different key per image is a different draw: the values move by more than that.
    other = pf.distributed_bits_per_dim(model, sde, x, key=jax.random.key(8), batch_size=2,
                                        **opts)
    assert np.max(np.abs(np.asarray(other.bpd) - np.asarray(got.bpd))) > 1e-3
    # A process whose share holds no batch (more processes than batches) returns 0 rows of
    # every field, with the dtypes and trailing shapes of a solved example.
    monkeypatch.setattr(_distributed, "process_slice", lambda num_items: (0, 0))
    monkeypatch.setattr(_distributed, "_slices", lambda num_items: [(0, 0)])
    empty = pf.distributed_bits_per_dim(model, sde, x, key=key, batch_size=2, **opts)
    assert empty.bpd.shape == (0,) and empty.bpd_probes.shape == (0, 1)
    assert empty.z.shape == (0, 2) and empty.nfe.dtype == got.nfe.dtype
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        pf.distributed_bits_per_dim(model, sde, x, key=key, batch_size=0, **opts)
