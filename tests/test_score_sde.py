"""`pf.load_score_sde` against the paper's own code: scores recorded from score_sde_pytorch and
score_sde (scripts/make_score_sde_fixtures.py, tests/data/score_sde/) for small versions of each
config family, in both checkpoint formats; parameter counts of the full-size configs from the
reference's own networks; bad input."""

import json
import lzma
import re
import sys
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from helpers import score_sde_fixture_config

import probflow as pf
from probflow._score_sde import build_network, load_score_model
from probflow._score_sde_configs import SCORE_SDE_CONFIGS

DATA = Path(__file__).parent / "data" / "score_sde"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
FIXTURES = MANIFEST["fixtures"]
CASES = [(fid, fmt) for fid, f in FIXTURES.items() for fmt in f["formats"]]
SUFFIX = {"torch": ".pth.xz", "flax": ".msgpack.xz"}
TOL = 1e-5  # float32 rounding, relative to the score's largest entry


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fixtures' checkpoints, decompressed (they are stored xz-compressed)."""
    out = tmp_path_factory.mktemp("score_sde")
    paths = {}
    for fid, fmt in CASES:
        path = out / (fid + SUFFIX[fmt].removesuffix(".xz"))
        path.write_bytes(lzma.decompress((DATA / (fid + SUFFIX[fmt])).read_bytes()))
        paths[fid, fmt] = path
    return paths


config_of = score_sde_fixture_config


def rel_err(a, b) -> float:
    """The largest |a - b| of each example relative to that example's largest |b|, maxed."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axes = tuple(range(1, a.ndim))
    return float(np.max(np.abs(a - b).max(axis=axes) / np.abs(b).max(axis=axes)))


@eqx.filter_jit
def scores(model, t, x):
    return jax.vmap(model)(t, x)


@pytest.mark.parametrize("fid", list(FIXTURES))
def test_config_table_and_overrides_match_the_reference(fid):
    """The table's named config plus the overrides is the config the reference resolved."""
    ref = FIXTURES[fid]["reference_config"]
    ours = json.loads(json.dumps(config_of(fid)))
    assert ours == ref


@pytest.mark.parametrize("fid,fmt", CASES)
def test_reproduces_the_papers_scores(fid, fmt, files):
    rec = np.load(DATA / f"{fid}.npz")
    cfg = config_of(fid)
    model, sde = pf.load_score_sde(files[fid, fmt], config=cfg)
    raw, _ = pf.load_score_sde(files[fid, fmt], config=cfg, ema=False)
    lo = -1.0 if cfg["data"]["centered"] else 0.0
    assert model.data_range == (lo, 1.0) and model.shape == rec["x"].shape[1:]
    assert type(sde).__name__ == {"vpsde": "VPSDE", "subvpsde": "SubVPSDE",
                                  "vesde": "VESDE"}[cfg["training"]["sde"]]
    out = scores(model, rec["t"], rec["x"])
    out_raw = scores(raw, rec["t"], rec["x"])
    assert out.dtype == jnp.float32
    assert rel_err(out, rec[f"{fmt}_ema"]) < TOL
    assert rel_err(out_raw, rec[f"{fmt}_raw"]) < TOL
    # the test can tell the EMA weights from the raw ones, and the times apart
    assert rel_err(rec[f"{fmt}_raw"], rec[f"{fmt}_ema"]) > 1e-2
    shifted = scores(model, rec["t"][::-1], rec["x"])
    assert rel_err(shifted, rec[f"{fmt}_ema"]) > 1e-2


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("fid", ["vp_ddpm", "ve_celebahq_256",
                                 "edited_residual"])
def test_float64_matches_the_papers_float64_scores(fid, files):
    """Against the JAX reference run in float64: the same function, not only to float32."""
    rec = np.load(DATA / f"{fid}.npz")
    model, _ = pf.load_score_sde(files[fid, "flax"], config=config_of(fid))
    out = scores(model, jnp.asarray(rec["t"], jnp.float64), jnp.asarray(rec["x"], jnp.float64))
    assert out.dtype == jnp.float64
    assert rel_err(out, rec["flax_ema64"]) < 1e-10
    assert rel_err(rec["flax_ema"], rec["flax_ema64"]) > 1e-8  # float32 could not pass this


@pytest.mark.parametrize("name", list(MANIFEST["full_size_parameter_counts"]))
def test_full_size_parameter_counts_match_the_reference(name):
    net = eqx.filter_eval_shape(build_network, name, key=jax.random.key(0))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(net))
    assert count == MANIFEST["full_size_parameter_counts"][name]


def test_every_continuous_config_is_known():
    assert set(MANIFEST["full_size_parameter_counts"]) == set(SCORE_SDE_CONFIGS)
    cifar = [n for n in SCORE_SDE_CONFIGS if "cifar10" in n]
    assert len(cifar) == 12  # 11 */cifar10_*_continuous and vp/ddpm/cifar10_continuous


# ----------------------------------------------------------------------------- with probflow


@pytest.fixture(scope="module")
def ddpm_model(files):
    return pf.load_score_sde(files["vp_ddpm", "torch"], config=config_of("vp_ddpm"))


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape))


def test_bits_per_dim_float32_agrees_with_float64(ddpm_model):
    """The likelihood ODE (drift and exact divergence through the loaded network), jitted, in
    both dtypes, on the same fixed steps; and bits/dim from it with the model's data range."""
    model, sde = ddpm_model
    x_int = _images(2, model.shape, seed=1)
    lo, hi = model.data_range
    x = lo + (hi - lo) * (x_int + 0.5) / 256
    # One solver and clock for both calls (bits_per_dim's defaults differ from log_likelihood's).
    kw = dict(trace="exact", steps=3, solver=diffrax.Tsit5(), time="t")
    ll32 = pf.log_likelihood(model, sde, np.asarray(x, np.float32), **kw)
    r = pf.bits_per_dim(model, sde, x_int, num_bins=256, data_range=model.data_range,
                        dequantize=False, **kw)
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        ll64 = pf.log_likelihood(model, sde, np.asarray(x, np.float64), **kw)
    finally:
        jax.config.update("jax_enable_x64", old)
    assert ll32.logp.dtype == jnp.float32 and ll64.logp.dtype == jnp.float64
    assert np.all(np.isfinite(np.asarray(ll64.logp)))
    np.testing.assert_allclose(np.asarray(ll32.logp), np.asarray(ll64.logp), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(ll32.nfe), np.asarray(ll64.nfe))
    assert abs(float(ll64.logp[0] - ll64.logp[1])) > 1e-2  # two images, two values
    d = x[0].size  # bits/dim of the same solve, in model space (-1, 1) with 256 bins
    expected = -(np.asarray(ll32.logp) + d * np.log((hi - lo) / 256)) / (d * np.log(2))
    np.testing.assert_allclose(np.asarray(r.bpd), expected, rtol=1e-5)


@pytest.mark.slow
def test_samplers_and_encoders_on_the_loaded_model(ddpm_model):
    model, sde = ddpm_model
    key = jax.random.key(3)
    pc = pf.sample_pc(model, sde, 2, model.shape, key=key, steps=5)
    em = pf.sample_sde(model, sde, 2, model.shape, key=key, steps=5)
    ode = pf.sample_ode(model, sde, 2, model.shape, key=key, steps=5)
    for r in (pc, em, ode):
        assert r.x.shape == (2, *model.shape) and np.all(np.isfinite(np.asarray(r.x)))
    assert np.all(np.asarray(pc.nfe) == 2 * 5 + 1)  # predictor + corrector per step, denoising
    assert not np.allclose(np.asarray(pc.x[0]), np.asarray(pc.x[1]))
    lo, hi = model.data_range
    x = lo + (hi - lo) * (_images(2, model.shape) + 0.5) / 256
    # encode solves the ODE that the likelihood augments: the same latents on the same steps
    z = pf.encode(model, sde, x, eps=1e-5, steps=8)
    ll = pf.log_likelihood(model, sde, x, key=key, eps=1e-5, steps=8)
    np.testing.assert_allclose(np.asarray(z.z), np.asarray(ll.z), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(z.z) - x).max() > 0.1
    back = pf.decode(model, sde, z.z, eps=1e-5, steps=8)
    assert back.x.shape == x.shape and np.all(np.isfinite(np.asarray(back.x)))


# ----------------------------------------------------------------------------- bad input


def _one_line_error(fn, match):
    with pytest.raises(pf.ScoreSDEImportError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_file_of_neither_format(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint\n")
    _one_line_error(lambda: pf.load_score_sde(bad, config="vp/cifar10_ddpmpp_continuous"),
                    "neither a score_sde_pytorch checkpoint .* nor a score_sde flax")
    empty = tmp_path / "empty.msgpack"
    empty.write_bytes(msgpack.packb({"step": 1}))
    _one_line_error(lambda: pf.load_score_sde(empty, config="vp/cifar10_ddpmpp_continuous"),
                    "neither")
    _one_line_error(lambda: pf.load_score_sde(tmp_path / "missing.pth", config="x"),
                    "no such file")


@pytest.mark.parametrize("fmt,name,got,want", [
    ("torch", "all_modules.0.weight", r"\(16, 4\)", r"\(512, 128\)"),
    ("flax", "Dense_0/kernel", r"\(4, 16\)", r"\(128, 512\)"),
])
def test_config_that_does_not_fit_names_the_first_parameter(fmt, name, got, want, files):
    msg = _one_line_error(
        lambda: pf.load_score_sde(files["vp_ddpmpp", fmt], config="vp/cifar10_ddpmpp_continuous"),
        "does not fit")
    assert name in msg and "vp/cifar10_ddpmpp_continuous" in msg
    assert re.search(f"{got} in the checkpoint but .* expects {want}", msg)


@pytest.mark.parametrize("fmt", ["torch", "flax"])
def test_deep_weights_with_the_shallow_config(fmt, files):
    cfg = config_of("vp_ncsnpp_deep")
    cfg["model"]["num_res_blocks"] = 1
    _one_line_error(lambda: pf.load_score_sde(files["vp_ncsnpp_deep", fmt], config=cfg),
                    "does not fit")


def test_missing_ema(files, tmp_path):
    import torch

    rec = np.load(DATA / "vp_ddpmpp.npz")
    cfg = config_of("vp_ddpmpp")
    ckpt = torch.load(files["vp_ddpmpp", "torch"], weights_only=True)
    del ckpt["ema"]
    path = tmp_path / "no_ema.pth"
    torch.save(ckpt, path)
    _one_line_error(lambda: pf.load_score_sde(path, config=cfg), "no EMA weights.*ema=False")
    model, _ = pf.load_score_sde(path, config=cfg, ema=False)
    assert rel_err(scores(model, rec["t"], rec["x"]), rec["torch_raw"]) < TOL

    state = msgpack.unpackb(files["vp_ddpmpp", "flax"].read_bytes(), raw=False,
                            strict_map_key=False)
    del state["params_ema"]
    path = tmp_path / "no_ema.msgpack"
    path.write_bytes(msgpack.packb(state))
    _one_line_error(lambda: pf.load_score_sde(path, config=cfg), "no EMA weights.*ema=False")
    model, _ = pf.load_score_sde(path, config=cfg, ema=False)
    assert rel_err(scores(model, rec["t"], rec["x"]), rec["flax_raw"]) < TOL


def test_unknown_config_lists_the_known_ones(files):
    msg = _one_line_error(
        lambda: pf.load_score_sde(files["vp_ddpmpp", "torch"], config="vp/cifar10_ddpmpp"),
        "unknown config 'vp/cifar10_ddpmpp'")
    assert all(name in msg for name in SCORE_SDE_CONFIGS)
    _one_line_error(lambda: pf.load_score_sde(files["vp_ddpmpp", "torch"],
                                              config={"model": {}, "data": {}}),
                    "no 'training' section")
    cfg = config_of("vp_ddpmpp")
    del cfg["model"]["fir"]
    _one_line_error(lambda: pf.load_score_sde(files["vp_ddpmpp", "torch"], config=cfg),
                    "model.fir is missing")


def test_torch_missing_gives_the_install_hint(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    _one_line_error(lambda: pf.load_score_sde(files["vp_ddpmpp", "torch"],
                                              config=config_of("vp_ddpmpp")),
                    r"needs torch \(pip install 'probflow\[score-sde\]'\)")


def test_chunked_msgpack_arrays(files, tmp_path):
    """flax stores arrays over 1 GiB as chunks; a chunked leaf loads as the whole array."""
    state = msgpack.unpackb(files["ve_ncsnpp", "flax"].read_bytes(), raw=False,
                            strict_map_key=False)
    ext = state["params_ema"]["Conv_0"]["kernel"]
    shape, dtype, buf = msgpack.unpackb(ext.data, raw=True)
    flat = np.frombuffer(buf, np.dtype(dtype.decode()))
    pack = lambda a: msgpack.ExtType(1, msgpack.packb((a.shape, a.dtype.name, a.tobytes())))
    state["params_ema"]["Conv_0"]["kernel"] = {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): s for i, s in enumerate(shape)},
        "chunks": {"0": pack(flat[:7]), "1": pack(flat[7:])},
    }
    path = tmp_path / "chunked.msgpack"
    path.write_bytes(msgpack.packb(state))
    rec = np.load(DATA / "ve_ncsnpp.npz")
    model, _ = pf.load_score_sde(path, config=config_of("ve_ncsnpp"))
    assert rel_err(scores(model, rec["t"], rec["x"]), rec["flax_ema"]) < TOL


def test_load_score_model_for_the_command_line(files):
    model, sde, data_range, bins = load_score_model(files["ve_ncsnpp", "torch"],
                                                    config_of("ve_ncsnpp"))
    assert data_range == (0.0, 1.0) and bins == 256 and isinstance(sde, pf.VESDE)
    model, sde, data_range, bins = load_score_model("digits-vp")
    assert bins == 17 and data_range == (0.0, 1.0) and isinstance(sde, pf.VPSDE)
    _one_line_error(lambda: load_score_model(files["ve_ncsnpp", "torch"]),
                    "checkpoint of the paper's code; name its config")
    _one_line_error(lambda: load_score_model("no-such-model"), "no such file")
