"""Paper-scale DDPM++ / NCSN++ configurations: sizes, filters, checkpoints, training steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf
from probflow._train_presets import TRAIN_PRESETS, parameter_count, train_preset
from probflow.models import DDPMpp
from probflow.models._ddpmpp import fir_downsample, fir_upsample


def official_parameter_count(*, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn=(16,),
                             resolution=32, channels=3, fourier=False, pyramid=False) -> int:
    """The number of parameters of score_sde's `NCSNpp` (models/ncsnpp.py, resblock_type
    "biggan", attention_type "ddpm", conditional), counted layer by layer from its constructor."""
    conv = lambda ci, co, k=3: k * k * ci * co + co
    dense = lambda ci, co: ci * co + co
    norm = lambda c: 2 * c
    temb = 4 * nf

    def resblock(ci, co, resample=False):  # ResnetBlockBigGANpp
        n = norm(ci) + conv(ci, co) + dense(temb, co) + norm(co) + conv(co, co)
        return n + (conv(ci, co, 1) if (ci != co or resample) else 0)

    attn_block = lambda c: norm(c) + 4 * dense(c, c)  # AttnBlockpp: NIN q, k, v, out
    total = (nf if fourier else 0) + dense(2 * nf if fourier else nf, temb) + dense(temb, temb)
    total += conv(channels, nf)
    hs, c, pyr = [nf], nf, channels
    levels = len(ch_mult)
    for i in range(levels):
        for _ in range(num_res_blocks):
            total += resblock(c, nf * ch_mult[i])
            c = nf * ch_mult[i]
            total += attn_block(c) if resolution // 2**i in attn else 0
            hs.append(c)
        if i != levels - 1:
            total += resblock(c, c, resample=True)
            if pyramid:  # Downsample(in_ch=pyramid_ch, out_ch=in_ch, with_conv=True): a 3x3 conv
                total += conv(pyr, c)
                pyr = c
            hs.append(c)
    total += 2 * resblock(c, c) + attn_block(c)
    for i in reversed(range(levels)):
        for _ in range(num_res_blocks + 1):
            total += resblock(c + hs.pop(), nf * ch_mult[i])
            c = nf * ch_mult[i]
        total += attn_block(c) if resolution // 2**i in attn else 0
        if i != 0:
            total += resblock(c, c, resample=True)
    assert not hs
    return total + norm(c) + conv(c, channels)


# Commonly quoted sizes of the paper's CIFAR-10 models (millions of parameters).
REFERENCE_MPARAMS = {
    "ddpmpp-cifar10": 62, "ddpmpp-deep-cifar10": 108,
    "ncsnpp-cifar10": 63, "ncsnpp-deep-cifar10": 108,
}


@pytest.mark.parametrize("name", list(TRAIN_PRESETS))
def test_configs_have_the_papers_sizes_and_hyperparameters(name):
    cfg = train_preset(name)
    model = jax.eval_shape(lambda: cfg.make_model(key=jax.random.key(0)))  # no allocation
    ncsn = cfg.network == "ncsnpp"
    expected = official_parameter_count(num_res_blocks=8 if cfg.deep else 4, fourier=ncsn,
                                        pyramid=ncsn)
    assert parameter_count(model) == expected
    ref = REFERENCE_MPARAMS.get(name, REFERENCE_MPARAMS["ddpmpp-cifar10"])
    assert abs(expected / 1e6 - ref) / ref < 0.02
    assert model.nf == 128 and model.ch_mult == (1, 2, 2, 2) and model.attn_resolutions == (16,)
    assert model.num_res_blocks == (8 if cfg.deep else 4) and model.dropout == 0.1
    assert (model.fir, model.progressive_input) == ((True, "residual") if ncsn else (False, "none"))
    t = cfg.train
    assert (t.batch_size, t.lr, t.warmup, t.grad_clip) == (128, 2e-4, 5000, 1.0)
    assert t.ema_decay == (0.999 if cfg.sde == "ve" else 0.9999)
    assert cfg.data == "tfds:cifar10" and cfg.shape == (32, 32, 3)


def _upfirdn2d_reference(x, k, up, down, pad0, pad1):
    """StyleGAN2's upfirdn2d_native for one channel [H, W], written with numpy loops."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    z = np.pad(z, ((pad0, pad1), (pad0, pad1)))
    kf = k[::-1, ::-1]
    kh = k.shape[0]
    out = np.zeros((z.shape[0] - kh + 1, z.shape[1] - kh + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.sum(z[i : i + kh, j : j + kh] * kf)
    return out[::down, ::down]


def test_fir_resampling_matches_upfirdn2d():
    x = np.random.default_rng(0).normal(size=(8, 8))
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    up = np.asarray(fir_upsample(jnp.asarray(x[..., None], jnp.float32)))[..., 0]
    np.testing.assert_allclose(up, _upfirdn2d_reference(x, 4 * k, 2, 1, 2, 1), atol=1e-5)
    down = np.asarray(fir_downsample(jnp.asarray(x[..., None], jnp.float32)))[..., 0]
    np.testing.assert_allclose(down, _upfirdn2d_reference(x, k, 1, 2, 1, 1), atol=1e-5)
    assert up.shape == (16, 16) and down.shape == (4, 4)


@pytest.mark.parametrize("variant", ["ddpmpp", "ncsnpp"])
def test_small_variant_runs_and_checkpoints(variant, tmp_path):
    sde = pf.VESDE() if variant == "ncsnpp" else pf.VPSDE()
    build = getattr(DDPMpp, variant)
    model = build((8, 8, 3), sde=sde, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), key=jax.random.key(0))
    # the zero-initialised output conv makes the initial score exactly 0; perturb it
    w = 0.1 * jax.random.normal(jax.random.key(1), model.net.conv_out.weight.shape)
    model = eqx.tree_at(lambda m: m.net.conv_out.weight, model, w)
    x = jax.random.uniform(jax.random.key(2), (8, 8, 3))
    call = eqx.filter_jit(lambda m, t: m(t, x))
    s1, s2 = call(model, jnp.asarray(0.2)), call(model, jnp.asarray(0.8))
    assert s1.shape == (8, 8, 3) and np.all(np.isfinite(np.asarray(s1)))
    assert float(jnp.abs(s1 - s2).max()) > 1e-3  # conditioned on time
    pf.save_checkpoint(tmp_path / "m.eqx", model, sde)
    loaded, _, _ = pf.load_checkpoint(tmp_path / "m.eqx")
    assert type(loaded) is DDPMpp and loaded.hyperparameters == model.hyperparameters
    np.testing.assert_array_equal(np.asarray(call(loaded, jnp.asarray(0.2))), np.asarray(s1))


def test_bad_hyperparameters():
    sde = pf.VPSDE()
    with pytest.raises(ValueError, match="progressive_input"):
        DDPMpp(sde=sde, progressive_input="output_skip", key=jax.random.key(0))
    with pytest.raises(ValueError, match="embedding"):
        DDPMpp(sde=sde, embedding="learned", key=jax.random.key(0))
    with pytest.raises(ValueError, match="not divisible"):
        DDPMpp((28, 28, 1), sde=sde, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        train_preset("nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddpmpp-cifar10", "ddpmpp-deep-cifar10", "ncsnpp-cifar10",
                                  "ncsnpp-deep-cifar10"])
def test_paper_config_takes_two_training_steps_on_mock_cifar10(name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import dataclasses

    cfg = train_preset(name)
    with tfds.testing.mock_data(num_examples=4):  # it substitutes its own data directory
        ds = pf.data.load(cfg.data, "train", data_dir=tmp_path)
    sde = cfg.make_sde()
    model = cfg.make_model(key=jax.random.key(0), sde=sde)
    train_cfg = dataclasses.replace(cfg.train, steps=2, batch_size=2, warmup=1)
    r = pf.train(model, sde, ds, train_cfg, progress=False)
    assert r.step == 2 and np.all(np.isfinite(r.losses))
    # the zero-initialised output layers received a gradient step
    assert float(jnp.abs(r.raw_model.net.conv_out.weight).max()) > 0


@pytest.mark.slow
def test_cli_config_trains_on_mock_cifar10(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from probflow._cli import main

    with tfds.testing.mock_data(num_examples=4):
        rc = main(["train", "--config", "ncsnpp-cifar10", "--steps", "2", "--batch-size", "2",
                   "--out", str(tmp_path / "run"), "--no-progress", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "ncsnpp-cifar10" in out
    model, sde, config = pf.load_checkpoint(tmp_path / "run" / "checkpoint.eqx")
    assert type(model) is DDPMpp and isinstance(sde, pf.VESDE)
    assert config["batch_size"] == 2 and config["lr"] == 2e-4 and config["ema_decay"] == 0.999
    assert config["data"] == "tfds:cifar10" and config["step"] == 2


def test_cli_config_rejects_a_contradicting_sde(tmp_path, capsys):
    from probflow._cli import main

    rc = main(["train", "--config", "ncsnpp-cifar10", "--sde", "vp", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "contradicts --preset" in err
