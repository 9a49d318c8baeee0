import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._checkpoint import read_checkpoint
from probflow.models import MLP

SDE = pf.VPSDE()
DATA = 0.5 + 0.3 * jax.random.normal(jax.random.key(0), (256, 2))


def tiny_model(seed=0):
    return MLP(2, sde=SDE, width=32, depth=2, key=jax.random.key(seed))


def config(**kw):
    base = dict(steps=60, batch_size=32, lr=3e-3, warmup=5, steps_per_call=10,
                checkpoint_every=20, seed=3)
    base.update(kw)
    return pf.TrainConfig(**base)


@pytest.mark.parametrize(
    "kw, match",
    [(dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(lr=0.0), "lr"),
     (dict(lr=float("nan")), "lr"), (dict(weighting="l1"), "weighting"),
     (dict(importance_sampling=True), "importance_sampling"), (dict(ema_decay=1.0), "ema_decay")],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        pf.TrainConfig(**kw)


def test_bad_data():
    with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(10, 3\)"):
        pf.train(tiny_model(), SDE, jnp.zeros((10, 3)), config(), progress=False)
    with pytest.raises(ValueError, match="float"):
        pf.train(tiny_model(), SDE, jnp.zeros((10, 2), int), config(), progress=False)
    with pytest.raises(ValueError, match="differs"):
        pf.train(tiny_model(), pf.SubVPSDE(), DATA, config(), progress=False)


def test_training_learns_the_gaussian_score():
    # Data N(0.5, 0.3^2 I): the exact score of p_t is known; training must get close to it.
    r = pf.train(tiny_model(), SDE, DATA, config(steps=600, checkpoint_every=600),
                 progress=False)
    assert r.step == 600 and len(r.losses) == 600
    t, x = 0.3, jnp.array([0.2, 0.9])
    scale, std = SDE.marginal(t)
    exact = -(x - scale * 0.5) / (scale**2 * 0.09 + std**2)
    before = tiny_model()(t, x)
    after = r.model(t, x)
    err_before = float(jnp.linalg.norm(before - exact))
    err_after = float(jnp.linalg.norm(after - exact))
    assert err_after < 0.25 * err_before


def test_resume_equals_uninterrupted(tmp_path):
    full = pf.train(tiny_model(), SDE, DATA, config(), out=tmp_path / "full", progress=False)
    pf.train(tiny_model(), SDE, DATA, config(steps=40), out=tmp_path / "part", progress=False)
    resumed = pf.train(tiny_model(), SDE, DATA, config(), out=tmp_path / "part", resume=True,
                       progress=False)
    assert resumed.step == 60
    for a, b in zip(jax.tree.leaves(full.model), jax.tree.leaves(resumed.model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(full.raw_model), jax.tree.leaves(resumed.raw_model),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(full.losses[40:], resumed.losses, rtol=1e-6)
    m, _, cfg = pf.load_checkpoint(tmp_path / "part" / "checkpoint.eqx")
    assert cfg["step"] == 60
    log = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    assert len(log) >= 3 and '"loss"' in log[0]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pf.train(tiny_model(), SDE, DATA, config(), out=tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="different"):
        pf.train(tiny_model(), SDE, DATA, config(lr=1e-2), out=tmp_path / "full", resume=True,
                 progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = np.asarray(DATA[:32]).copy()
    # Finite (NaN data is refused up front, test_bad_input.py), but its loss overflows: first
    # sampled at some step > 0 (seed 3), the loss becomes non-finite there.
    data[5] = 3e38
    cfg = config(steps=200, batch_size=1, steps_per_call=1, checkpoint_every=1)
    with pytest.raises(pf.TrainingDivergedError,
                       match=r"became (?:nan|inf) at step (\d+)") as info:
        pf.train(tiny_model(), SDE, jnp.asarray(data), cfg, out=tmp_path / "r", progress=False)
    bad = int(info.value.args[0].split("at step ")[1].split(";")[0])
    assert bad > 0
    header, _, _ = read_checkpoint(tmp_path / "r" / "checkpoint.eqx")
    assert header["step"] == bad  # steps 0..bad-1 done: the checkpoint after them
    m, _, _ = pf.load_checkpoint(tmp_path / "r" / "checkpoint.eqx")
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(m))


def test_kill_9_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "probflow", "train", "--data", "digits", "--sde", "vp",
           "--model", "mlp", "--width", "16", "--depth", "1", "--steps", "1000000",
           "--checkpoint-every", "3", "--steps-per-call", "1", "--batch-size", "8",
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ckpt = out / "checkpoint.eqx"
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.0))  # a random moment, likely mid-write sometimes
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    model, sde, cfg = pf.load_checkpoint(out / "checkpoint.eqx")
    assert cfg["step"] % 3 == 0 and cfg["step"] > 0
    assert [p for p in os.listdir(out) if p.endswith(".eqx")] == ["checkpoint.eqx"]


@pytest.mark.parametrize("warmup, lr0", [(5, 3e-3 / 5), (0, 3e-3), (1, 3e-3)])
def test_first_step_moves_the_weights_at_the_warmup_rate(warmup, lr0):
    # Warm-up step k (from 0) uses lr * min(1, (k + 1) / warmup): the first step is not wasted.
    # Adam's first update is -lr0 * g / (|g| + 1e-8) per coordinate, so every weight with a
    # non-negligible gradient moves by lr0 exactly.
    model = tiny_model()
    r = pf.train(model, SDE, DATA, config(steps=1, warmup=warmup, steps_per_call=1),
                 progress=False)
    moved = np.concatenate([np.abs(np.ravel(np.asarray(a) - np.asarray(b))) for a, b in
                            zip(jax.tree.leaves(r.raw_model), jax.tree.leaves(model),
                                strict=True)])
    np.testing.assert_allclose(np.max(moved), lr0, rtol=1e-3)
    assert np.median(moved) > 0.5 * lr0
