"""Every `probflow` subcommand beyond train/bpd, run as a subprocess on real files."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import probflow as pf
from probflow._cli._sampling import make_mask


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny MLP on the digits shape: the plumbing, not the quality, is tested (it
    compiles in a fraction of a U-Net's time)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.eqx"
    sde = pf.VPSDE()
    model = pf.models.MLP((8, 8, 1), sde=sde, width=32, depth=1, key=jax.random.key(0))
    pf.save_checkpoint(path, model, sde, None, num_bins=17, data_range=(0.0, 1.0), data="digits")
    return str(path)


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "probflow", *args], capture_output=True, text=True,
        cwd=cwd, env=env, timeout=900,
    )


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_sample_all_samplers(tiny_checkpoint, tmp_path):
    for sampler, extra in [("ode", ["--solver", "heun", "--steps", "3"]),
                           ("sde", ["--sde-steps", "4"]), ("pc", ["--sde-steps", "4"])]:
        out = tmp_path / f"{sampler}.png"
        js = tmp_path / f"{sampler}.json"
        stdout = _ok(_run("sample", "--checkpoint", tiny_checkpoint, "--sampler", sampler,
                          "--num", "4", "--out", str(out), "--json", str(js), *extra))
        assert "nfe mean" in stdout and sampler in stdout
        assert Image.open(out).size[0] > 8
        nfe = {"ode": 6, "sde": 4, "pc": 4 * 2 + 1}[sampler]
        assert json.loads(js.read_text())["nfe_mean"] == nfe


def test_encode_then_decode(tiny_checkpoint, tmp_path):
    lat = tmp_path / "z.npz"
    stdout = _ok(_run("encode", "--checkpoint", tiny_checkpoint, "--limit", "3", "--solver",
                      "heun", "--steps", "4", "--out", str(lat)))
    assert "round-trip" in stdout
    data = np.load(lat)
    assert data["z"].shape == (3, 8, 8, 1) and data["x"].shape == (3, 8, 8, 1)
    js = tmp_path / "d.json"
    png = tmp_path / "d.png"
    _ok(_run("decode", "--latents", str(lat), "--solver", "heun", "--steps", "4",
             "--out", str(png), "--json", str(js)))
    res = json.loads(js.read_text())
    assert res["nfe_mean"] == 8
    assert res["round_trip_rel_error_mean"] is not None and res["round_trip_rel_error_mean"] >= 0
    assert png.exists()


def test_nfe_curve(tiny_checkpoint, tmp_path):
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    stdout = _ok(_run("nfe-curve", "--checkpoint", tiny_checkpoint, "--solvers", "euler,tsit5",
                      "--step-counts", "2,4", "--tolerances", "1e-2", "--sde-steps", "3",
                      "--likelihood-images", "2", "--num-samples", "8", "--out", str(png),
                      "--json", str(js)))
    assert "ode-euler" in stdout
    res = json.loads(js.read_text())
    samplers = {r["sampler"] for r in res["rows"]}
    assert {"ode-euler", "ode-tsit5", "reverse-sde", "pc"} <= samplers
    euler = [r for r in res["rows"] if r["sampler"] == "ode-euler"]
    assert [r["nfe_mean"] for r in euler] == [2, 4]
    assert all(r["frechet"] is not None for r in res["rows"])
    assert res["likelihood_rows"] and png.exists()


def test_inpaint_and_masks(tiny_checkpoint, tmp_path):
    png, js = tmp_path / "i.png", tmp_path / "i.json"
    _ok(_run("inpaint", "--checkpoint", tiny_checkpoint, "--limit", "2", "--steps", "3",
             "--mask", "center", "--out", str(png), "--json", str(js)))
    res = json.loads(js.read_text())
    assert res["nfe_mean"] == 3 * 2 + 1 and 0.0 <= res["classifier_accuracy"] <= 1.0
    assert png.exists()
    left = make_mask("left", (8, 8, 1))
    assert left[:, :4].all() and not left[:, 4:].any()
    center = make_mask("center", (8, 8, 1))
    assert center.sum() == 64 - 16
    Image.fromarray((left[..., 0] * 255).astype(np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(make_mask(str(tmp_path / "m.png"), (8, 8, 1)), left)


def test_train_classifier(tmp_path):
    out = tmp_path / "clf.eqx"
    stdout = _ok(_run("train-classifier", "--sde", "none", "--steps", "500", "--out", str(out)))
    assert "test acc" in stdout
    clf, info = pf.load_classifier(out)
    assert info["test_accuracy"] > 0.8  # digits are easy: far above chance (0.1)


def test_demo_quick(tiny_checkpoint, tmp_path):
    out = tmp_path / "demo"
    stdout = _ok(_run("demo", "--checkpoint", tiny_checkpoint, "--quick", "--out", str(out)))
    assert "test bits/dim" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bpd"]["images"] == 8 and summary["bpd"]["mean"] > 0
    for name in ("samples_ode.png", "samples_sde.png", "samples_pc.png", "encode_decode.png",
                 "nfe_curve.png"):
        assert (out / name).exists()


def test_user_mistakes_print_one_line(tiny_checkpoint, tmp_path):
    cases = [
        ("sample", "--checkpoint", tiny_checkpoint, "--solver", "rk45"),
        ("sample", "--checkpoint", str(tmp_path / "missing.eqx")),
        ("sample", "--checkpoint", tiny_checkpoint, "--rtol", "-1"),
        ("decode", "--latents", str(tmp_path / "none.npz")),
        ("colorize", "--checkpoint", tiny_checkpoint, "--data", "digits"),
        ("inpaint", "--checkpoint", tiny_checkpoint, "--mask", "diagonal"),
        ("nfe-curve", "--checkpoint", tiny_checkpoint, "--tolerances", "abc"),
    ]
    for i, args in enumerate(cases):
        proc = _run(*args)
        assert proc.returncode != 0
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        if i == 0:
            assert "rk45" in proc.stderr


def test_colorize(tmp_path):
    sde = pf.VPSDE()
    path = tmp_path / "colour.eqx"
    model = pf.models.MLP((8, 8, 3), sde=sde, width=32, depth=1, key=jax.random.key(1))
    pf.save_checkpoint(path, model, sde, None, num_bins=17, data_range=(0.0, 1.0),
                       data="digits-color")
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    stdout = _ok(_run("colorize", "--checkpoint", str(path), "--data", "digits-color",
                      "--limit", "3", "--steps", "3", "--out", str(png), "--json", str(js)))
    assert "grey err" in stdout
    res = json.loads(js.read_text())
    assert res["max_grey_error"] < 1e-5 and res["nfe_mean"] == 3 * 2 + 1
    assert png.exists()
