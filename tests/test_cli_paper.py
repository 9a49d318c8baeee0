"""`--checkpoint PATH --config NAME` on the command line: the paper's own checkpoints (the small
fixtures of tests/data/score_sde) through every model-taking subcommand, checked against the
library called directly on the same loaded model."""

import json
import lzma
from pathlib import Path

import diffrax
import jax
import numpy as np
import pytest
from helpers import SCORE_SDE_DATA, score_sde_fixture_config

import probflow as pf
from probflow._cli import main

SUFFIX = {"torch": ".pth", "flax": ".msgpack"}


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """Checkpoint files, edited-config JSON files and 8x8x3 8-bit images as npz:PATH data."""
    out = tmp_path_factory.mktemp("paper_cli")
    files = {}
    for fid, fmt in (("vp_ddpmpp", "torch"), ("ve_ncsnpp", "flax")):
        ckpt = out / (fid + SUFFIX[fmt])
        packed = SCORE_SDE_DATA / (fid + SUFFIX[fmt] + ".xz")
        ckpt.write_bytes(lzma.decompress(packed.read_bytes()))
        cfg = out / f"{fid}.json"
        cfg.write_text(json.dumps(score_sde_fixture_config(fid)))
        files[fid] = (str(ckpt), str(cfg))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    npz = out / "images.npz"
    np.savez(npz, test_images=images, test_labels=np.arange(6))
    return files, f"npz:{npz}", images


def test_bpd_takes_the_models_data_range_and_256_bins(paper, tmp_path):
    files, data, images = paper
    ckpt, cfg = files["vp_ddpmpp"]
    js = tmp_path / "bpd.json"
    assert main(["bpd", "--checkpoint", ckpt, "--config", cfg, "--data", data, "--limit", "3",
                 "--rtol", "1e-2", "--atol", "1e-2", "--seed", "3", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    model, sde = pf.load_score_sde(ckpt, config=score_sde_fixture_config("vp_ddpmpp"))
    assert model.data_range == (-1.0, 1.0)  # a centred config
    # Image i draws from fold_in(fold_in(key(seed), repeat 0), i).
    key = jax.numpy.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 0), i)
                           for i in range(3)])
    ref = pf.bits_per_dim(model, sde, images[:3], key=key, num_bins=256, data_range=(-1.0, 1.0),
                          rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(res["bpd"], float(np.mean(ref.bpd)), rtol=1e-5)
    # The data range matters: read as (0, 1) data the same images give another number.
    wrong = pf.bits_per_dim(model, sde, images[:3], key=key, num_bins=256, rtol=1e-2, atol=1e-2)
    assert abs(float(np.mean(wrong.bpd)) - res["bpd"]) > 0.1
    assert res["nfe_mean"] == pytest.approx(float(np.mean(ref.nfe)))


def test_encode_records_the_config_and_decode_uses_it(paper, tmp_path):
    files, data, images = paper
    ckpt, cfg = files["vp_ddpmpp"]
    lat = tmp_path / "z.npz"
    ode = ["--solver", "euler", "--ode-steps", "3"]
    assert main(["encode", "--checkpoint", ckpt, "--config", cfg, "--data", data, "--limit", "2",
                 *ode, "--out", str(lat)]) == 0
    saved = np.load(lat)
    assert str(saved["config"]) == cfg and str(saved["checkpoint"]) == ckpt
    model, sde = pf.load_score_sde(ckpt, config=score_sde_fixture_config("vp_ddpmpp"))
    x = saved["x"]
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < 0.0  # in the model's (-1, 1)
    enc = pf.encode(model, sde, x, solver=diffrax.Euler(), steps=3)
    np.testing.assert_allclose(saved["z"], enc.z, rtol=1e-5, atol=1e-5)
    out = tmp_path / "x.npz"
    # No --checkpoint or --config: both come from the latents file.
    assert main(["decode", "--latents", str(lat), *ode, "--npz", str(out)]) == 0
    dec = pf.decode(model, sde, saved["z"], solver=diffrax.Euler(), steps=3,
                    eps=float(saved["eps"]))
    np.testing.assert_allclose(np.load(out)["x"], dec.x, rtol=1e-5, atol=1e-5)


def test_sample_with_a_paper_checkpoint_is_the_librarys_sample(paper, tmp_path):
    files, _, _ = paper
    ckpt, cfg = files["vp_ddpmpp"]
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", ckpt, "--config", cfg, "--sampler", "ode", "--num",
                 "2", "--solver", "euler", "--ode-steps", "2", "--seed", "5", "--npz",
                 str(out)]) == 0
    model, sde = pf.load_score_sde(ckpt, config=score_sde_fixture_config("vp_ddpmpp"))
    ref = pf.sample_ode(model, sde, 2, (8, 8, 3), key=jax.random.key(5),
                        solver=diffrax.Euler(), steps=2)
    got = np.load(out)
    np.testing.assert_allclose(got["x"], ref.x, rtol=1e-5, atol=1e-5)
    assert got["nfe"].tolist() == [2, 2]


def test_paper_checkpoint_mistakes_are_one_line_errors(paper, capsys):
    files, data, _ = paper
    ckpt, cfg = files["vp_ddpmpp"]
    cases = [
        # A paper checkpoint without --config says to name it.
        (["--checkpoint", ckpt], "config"),
        # The full-size named config does not fit the small weights: the first parameter named.
        (["--checkpoint", ckpt, "--config", "vp/cifar10_ddpmpp_continuous"], "shape"),
        (["--checkpoint", ckpt, "--config", "vp/no_such_config"], "vp/cifar10_ddpmpp_continuous"),
        (["--checkpoint", ckpt, "--config", str(Path(cfg).with_name("missing.json"))],
         "cannot read the config file"),
    ]
    for argv, match in cases:
        assert main(["bpd", *argv, "--data", data, "--limit", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
        assert err.startswith(("probflow bpd: error: --checkpoint",
                               "probflow bpd: error: --config"))


def test_raw_weights_differ_from_the_ema_weights(paper, tmp_path):
    files, _, _ = paper
    ckpt, cfg = files["vp_ddpmpp"]
    outs = []
    for extra in ([], ["--raw-weights"]):
        out = tmp_path / f"s{len(extra)}.npz"
        assert main(["sample", "--checkpoint", ckpt, "--config", cfg, "--sampler", "ode",
                     "--num", "1", "--solver", "euler", "--ode-steps", "1", "--npz", str(out),
                     *extra]) == 0
        outs.append(np.load(out)["x"])
    raw, sde = pf.load_score_sde(ckpt, config=score_sde_fixture_config("vp_ddpmpp"), ema=False)
    ref = pf.sample_ode(raw, sde, 1, (8, 8, 3), key=jax.random.key(0), solver=diffrax.Euler(),
                        steps=1)
    np.testing.assert_allclose(outs[1], ref.x, rtol=1e-5, atol=1e-5)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


@pytest.mark.slow
def test_every_other_subcommand_takes_a_flax_paper_checkpoint(paper, tmp_path):
    """inpaint, colorize, nfe-curve and the SDE/PC samplers on the JAX code's VE NCSN++ file."""
    files, data, images = paper
    ckpt, cfg = files["ve_ncsnpp"]
    model_args = ["--checkpoint", ckpt, "--config", cfg]
    for sampler in ("sde", "pc"):
        js = tmp_path / f"{sampler}.json"
        assert main(["sample", *model_args, "--sampler", sampler, "--num", "2", "--sde-steps",
                     "3", "--json", str(js)]) == 0
        # sample_sde: one evaluation a step; sample_pc: predictor + one corrector step, and one
        # more for the final denoising (pf.sample_pc's docstring).
        expected = 3 if sampler == "sde" else 3 * 2 + 1
        assert json.loads(js.read_text())["nfe_max"] == expected
    js = tmp_path / "inpaint.json"
    assert main(["inpaint", *model_args, "--data", data, "--limit", "2", "--sde-steps", "3",
                 "--out", str(tmp_path / "i.png"), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["images"] == 2
    js = tmp_path / "colorize.json"
    assert main(["colorize", *model_args, "--data", data, "--limit", "2", "--sde-steps", "3",
                 "--out", str(tmp_path / "c.png"), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["images"] == 2
    js = tmp_path / "curve.json"
    assert main(["nfe-curve", *model_args, "--data", data, "--num-samples", "2", "--solvers",
                 "euler", "--ode-steps", "2", "--tolerances", "0.1", "--sde-steps", "3",
                 "--likelihood-images", "0", "--reference-tol", "1e-2", "--out",
                 str(tmp_path / "curve.png"), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["rows"]
    # The demo runs on the digits data only, and says so.
    assert main(["demo", *model_args, "--quick", "--out", str(tmp_path / "demo")]) == 2
