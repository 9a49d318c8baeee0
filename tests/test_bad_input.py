"""Bad input ends in one line naming its cause (issue 19, items 5 and 6).

Command-line cases run `probflow` in-process (`main`), each failing before any solve: exit status
non-zero, exactly one line on stderr, no traceback. Output paths are checked before the work
(a directory, a file used as a folder, /proc and /sys, where even root cannot create files; a
real read-only file system and a full one in a private mount namespace where available). API
cases: inputs against the model's example shape, data against `num_bins`, NaN training data.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import score_sde_fixture_config

import probflow as pf
from probflow._cli._main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny MLP checkpoint on the digits shape, good and bad data and latents files."""
    d = tmp_path_factory.mktemp("bad_input")
    sde = pf.VPSDE()
    model = pf.models.MLP((8, 8, 1), sde=sde, width=16, depth=1, key=jax.random.key(0))
    ckpt = d / "tiny.eqx"
    pf.save_checkpoint(ckpt, model, sde, None, num_bins=17, data_range=(0.0, 1.0), data="digits")
    nan_model = jax.tree_util.tree_map(
        lambda a: a.at[0].set(jnp.nan) if isinstance(a, jax.Array) and a.ndim == 2 else a, model)
    pf.save_checkpoint(d / "nan.eqx", nan_model, sde, None)
    images = np.random.default_rng(0).integers(0, 17, (4, 8, 8, 1))
    np.savez(d / "good.npz", images=images, num_bins=17)
    np.savez(d / "bins_array.npz", images=images, num_bins=np.array([17, 17]))
    np.savez(d / "bins_float.npz", images=images, num_bins=17.9)
    np.savez(d / "bins_huge.npz", images=images, num_bins=2**40)
    np.savez(d / "levels_high.npz", images=images + 300, num_bins=17)
    np.savez(d / "levels_negative.npz", images=images - 20, num_bins=17)
    np.savez(d / "float_images.npz", images=images / 17.0, num_bins=17)
    np.savez(d / "no_images.npz", pixels=images)
    np.save(d / "plain.npy", images)
    z = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
    common = dict(eps=1e-3, checkpoint=str(ckpt), config="", raw_weights=False)
    np.savez(d / "z.npz", z=z, **common)
    np.savez(d / "z_nan.npz", z=np.where(np.arange(z.size).reshape(z.shape) == 5, np.nan, z),
             **common)
    np.savez(d / "z_inf.npz", z=np.full_like(z, np.inf), **common)
    np.savez(d / "z_eps_array.npz", z=z, **{**common, "eps": np.array([1e-3, 1e-3])})
    np.savez(d / "z_eps_text.npz", z=z, **{**common, "eps": "small"})
    np.savez(d / "z_ckpt_array.npz", z=z, **{**common, "checkpoint": np.array([1, 2])})
    np.savez(d / "z_int.npz", z=z.astype(np.int32), **common)
    np.savez(d / "z_flat.npz", z=z.reshape(-1), **common)
    np.savez(d / "z_shape.npz", z=z[:, :4], **common)
    np.savez(d / "z_x_shape.npz", z=z, x=z[:2], **common)
    np.savez(d / "no_z.npz", latents=z)
    np.save(d / "z.npy", z)
    (d / "empty.eqx").write_bytes(b"")
    (d / "text.eqx").write_text("not a checkpoint\n")
    (d / "a_file").write_text("a file, not a folder\n")
    (d / "a_dir.png").mkdir()
    (d / "a_dir.npz").mkdir()
    (d / "a_dir.json").mkdir()
    (d / "a_dir.eqx").mkdir()
    (d / "empty_run").mkdir()
    (d / "not_an_image.png").write_text("not a PNG\n")
    cfg = score_sde_fixture_config("vp_ddpmpp")
    cfg["model"]["ch_mult"] = 5
    (d / "bad_config.json").write_text(json.dumps(cfg))
    (d / "list_config.json").write_text("[1, 2]")
    (d / "broken_config.json").write_text("{not json")
    return d


def _one_line_failure(argv, capsys) -> str:
    code = main([*argv, "--no-compile-cache"])
    err = capsys.readouterr().err
    assert code != 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# (command line with {d} for the files' folder, a fragment the one line must contain)
CLI_CASES = [
    # Output paths, checked before the work.
    ("sample --checkpoint {d}/tiny.eqx --out {d}/a_dir.png", "--out: '{d}/a_dir.png' is a dir"),
    ("sample --checkpoint {d}/tiny.eqx --out {d}/a_file/x.png", "is a file, not a folder"),
    ("sample --checkpoint {d}/tiny.eqx --out /sys/probflow.png", "cannot write"),
    ("sample --checkpoint {d}/tiny.eqx --out /proc/probflow.png", "cannot write"),
    ("sample --checkpoint {d}/tiny.eqx --out {d}/x.jpg", "expected a .png file name"),
    ("sample --checkpoint {d}/tiny.eqx --npz {d}/a_dir.npz", "--npz: '{d}/a_dir.npz' is a dir"),
    ("sample --checkpoint {d}/tiny.eqx --json {d}/a_dir.json", "--json: "),
    ("sample --checkpoint {d}/tiny.eqx --json /proc/x.json", "--json: cannot write"),
    ("encode --checkpoint {d}/tiny.eqx --out {d}/a_dir.npz", "--out: '{d}/a_dir.npz' is a dir"),
    ("encode --checkpoint {d}/tiny.eqx --out /sys/z.npz", "--out: cannot write"),
    ("encode --checkpoint {d}/tiny.eqx --out {d}/z2.npz --json {d}/a_file/r.json", "--json"),
    ("decode --latents {d}/z.npz --out {d}/a_dir.png", "is a directory"),
    ("decode --latents {d}/z.npz --npz /sys/x.npz", "--npz: cannot write"),
    ("decode --latents {d}/z.npz --json {d}/a_dir.json", "--json"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/good.npz --json {d}/a_dir.json",
     "--json: '{d}/a_dir.json' is a directory"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/good.npz --json /sys/b.json", "cannot write"),
    ("inpaint --checkpoint {d}/tiny.eqx --out {d}/a_dir.png", "is a directory"),
    ("inpaint --checkpoint {d}/tiny.eqx --out /proc/i.png", "cannot write"),
    ("colorize --checkpoint {d}/tiny.eqx --out {d}/a_file/c.png", "is a file, not a folder"),
    ("colorize --checkpoint {d}/tiny.eqx --json /sys/c.json", "--json: cannot write"),
    ("nfe-curve --checkpoint {d}/tiny.eqx --out {d}/a_dir.png", "is a directory"),
    ("nfe-curve --checkpoint {d}/tiny.eqx --json /proc/n.json", "--json: cannot write"),
    ("demo --checkpoint {d}/tiny.eqx --out {d}/a_file", "exists and is not a folder"),
    ("demo --checkpoint {d}/tiny.eqx --out /sys/demo", "cannot"),
    ("demo --checkpoint {d}/tiny.eqx --out {d}/demo --json {d}/a_dir.json", "--json"),
    ("train --out {d}/a_file --data digits --sde vp --train-steps 1",
     "exists and is not a folder"),
    ("train --out /sys/run --data digits --sde vp --train-steps 1", "cannot write"),
    ("train --out {d}/a_file/run --data digits --sde vp --train-steps 1", "is a file"),
    ("train-classifier --out {d}/a_dir.eqx", "is a directory"),
    ("train-classifier --out /proc/c.eqx", "cannot write"),
    ("train-classifier --out {d}/c.eqx --json {d}/a_dir.json", "--json"),
    # Data files.
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/plain.npy", "a .npy array, not a .npz"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/bins_array.npz",
     "num_bins must be one integer, got an array of dtype int64 and shape (2,)"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/bins_float.npz",
     "num_bins must be one integer, got an array of dtype float64 and shape () (17.9)"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/bins_huge.npz",
     "num_bins must be an integer in [2, 2**24]"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/levels_high.npz",
     "images must be integers in [0, num_bins) = [0, 17), got values in [300,"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/levels_negative.npz", "got values in [-20,"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/float_images.npz", "got dtype float64"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/no_images.npz", "no 'test_images' or 'imag"),
    ("bpd --checkpoint {d}/tiny.eqx --data npz:{d}/missing.npz", "no such file"),
    ("bpd --checkpoint {d}/tiny.eqx --data no-such-data", "--data"),
    ("train --out {d}/run1 --data npz:{d}/levels_high.npz --sde vp --train-steps 1", "[300,"),
    ("train --out {d}/run2 --data npz:{d}/plain.npy --sde vp --train-steps 1", ".npy array"),
    # Latents.
    ("decode --latents {d}/z_nan.npz", "z holds NaN or inf values in 1 of 3 latents"),
    ("decode --latents {d}/z_inf.npz", "z holds NaN or inf values in 3 of 3 latents"),
    ("decode --latents {d}/z_eps_array.npz", "eps must be a number in (0, T) (one float), got "
                                             "an array of dtype float64 and shape (2,)"),
    ("decode --latents {d}/z_eps_text.npz", "eps must be a number"),
    ("decode --latents {d}/z_ckpt_array.npz", "checkpoint must be a name"),
    ("decode --latents {d}/z_int.npz", "z must be a floating array"),
    ("decode --latents {d}/z_flat.npz", "z must be a floating array [N, ...]"),
    ("decode --latents {d}/z_shape.npz", "do not fit the model's (8, 8, 1)"),
    ("decode --latents {d}/z_x_shape.npz", "x must be a floating array of z's shape"),
    ("decode --latents {d}/no_z.npz", "holds no 'z' array (holds: latents)"),
    ("decode --latents {d}/z.npy", "is a .npy array, not a latents .npz"),
    ("decode --latents {d}/plain.npy", "is a .npy array"),
    ("decode --latents {d}/tiny.eqx", "is not a latents .npz"),
    ("decode --latents {d}/missing.npz", "no such file"),
    ("decode --latents {d}/z.npz --eps 2", "eps must lie in (0, T=1.0)"),
    # Model files.
    ("sample --checkpoint {d}/good.npz", "is a numpy .npz archive, not a model checkpoint"),
    ("sample --checkpoint {d}/plain.npy", "not a probflow checkpoint (bad magic bytes)"),
    ("sample --checkpoint {d}/empty.eqx", "checkpoint file is truncated"),
    ("sample --checkpoint {d}/text.eqx", "not a probflow checkpoint"),
    ("sample --checkpoint {d}/nan.eqx", "holds non-finite weights (NaN or inf)"),
    ("sample --checkpoint {d}/empty_run", "is a folder without a checkpoint.eqx"),
    ("sample --checkpoint {d}/missing.eqx", "no such file"),
    ("sample --checkpoint {d}/good.npz --config vp/cifar10_ddpmpp_continuous",
     "numpy .npz archive"),
    ("sample --checkpoint {d}/text.eqx --config vp/cifar10_ddpmpp_continuous", "neither"),
    ("sample --checkpoint {d}/tiny.eqx --config {d}/missing.json", "--config: cannot read"),
    ("bpd --checkpoint {d}/nan.eqx --data npz:{d}/good.npz --limit 1", "non-finite weights"),
    ("inpaint --checkpoint {d}/nan.eqx", "non-finite weights"),
    ("inpaint --checkpoint {d}/tiny.eqx --mask {d}/missing.png", "--mask: no such file"),
    ("colorize --checkpoint {d}/tiny.eqx", "colorize needs a colour model"),
    ("inpaint --checkpoint {d}/tiny.eqx --mask {d}/not_an_image.png", "--mask: cannot read"),
    ("sample --checkpoint {d}/text.eqx --config {d}/bad_config.json",
     "a model or data field has the wrong type"),
    ("sample --checkpoint {d}/text.eqx --config {d}/list_config.json", "must be a mapping"),
    ("sample --checkpoint {d}/text.eqx --config {d}/broken_config.json",
     "--config: cannot read the config file"),
    ("train --out {d}/run3 --data npz:{d}/good.npz --sde vp --train-steps 1 --validation 9",
     "--validation 9: num must be an int in (0, 4), got 9 (the data has 4)"),
]


@pytest.mark.parametrize("line, expected", CLI_CASES, ids=[c[0][:60] for c in CLI_CASES])
def test_bad_command_lines_print_one_line(files, capsys, line, expected):
    argv = line.format(d=files).split()
    message = _one_line_failure(argv, capsys)
    assert expected.format(d=files) in message
    assert message.startswith(f"probflow {argv[0]}: error: ")


def test_output_checked_before_the_work_keeps_nothing_half_done(files, capsys):
    """The bad --json of `encode` is found before encoding: no latents file is written either,
    and a good run afterwards writes both."""
    out = files / "before.npz"
    _one_line_failure(["encode", "--checkpoint", str(files / "tiny.eqx"), "--limit", "2",
                       "--solver", "euler", "--steps", "1", "--out", str(out),
                       "--json", str(files / "a_dir.json")], capsys)
    assert not out.exists()
    nested = files / "new" / "folder" / "r.json"
    assert main(["encode", "--checkpoint", str(files / "tiny.eqx"), "--limit", "2", "--solver",
                 "euler", "--steps", "1", "--out", str(out), "--json", str(nested),
                 "--no-compile-cache"]) == 0
    capsys.readouterr()
    assert np.load(out)["z"].shape == (2, 8, 8, 1) and nested.exists()  # folders created


def _in_private_mount(options: str, command: list[str], mount_point) -> subprocess.CompletedProcess:
    """`command` in a private mount namespace where `mount_point` is a tmpfs with `options`
    (skips where unprivileged namespaces are not available)."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        pytest.skip("needs util-linux unshare")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount -t tmpfs -o {options} tmpfs {mount_point}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    script = f'mount -t tmpfs -o {options} tmpfs {mount_point} && exec "$@"'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command],
                          capture_output=True, text=True, env=env, timeout=600)


def test_read_only_file_system_is_found_before_the_work(files, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    proc = _in_private_mount("ro,size=64k", [
        sys.executable, "-m", "probflow", "sample", "--checkpoint", str(files / "tiny.eqx"),
        "--num", "2", "--solver", "euler", "--steps", "1", "--out", str(mnt / "s.png"),
        "--no-compile-cache"], mnt)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0], proc.stderr
    assert "--out: cannot write" in lines[0] and "nfe" not in proc.stdout  # no work was done


def test_full_disk_while_writing_is_one_line(files, tmp_path):
    """A 16 KiB tmpfs takes the probe but not the 64 samples' .npz (16 KiB of pixels)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = _in_private_mount("size=16k", [
        sys.executable, "-m", "probflow", "sample", "--checkpoint", str(files / "tiny.eqx"),
        "--num", "64", "--solver", "euler", "--steps", "1", "--npz", str(mnt / "s.npz"),
        "--no-compile-cache"], mnt)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
    assert "--npz: cannot write" in lines[0]


# ---------------------------------------------------------------------------------------------
# The API.


def test_log_likelihood_rejects_an_axis_the_model_does_not_expect(mixture2d):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    x = mixture2d.sample(jax.random.key(0), 3)
    r = pf.log_likelihood(model, sde, x, trace="exact", eps=1e-5, rtol=1e-6, atol=1e-6)
    # The right shape gives the exact density (float32 solve to ~1e-2; the wrong shape gave -111
    # where the density is -7, issue 19).
    np.testing.assert_allclose(r.logp, mixture2d.log_prob(x, sde, 1e-5), atol=2e-2)
    with pytest.raises(ValueError, match=r"x must be one example of shape \(2,\).*got shape "
                                         r"\(2, 1\)") as info:
        pf.log_likelihood(model, sde, x[..., None], key=jax.random.key(1))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        mixture2d.classifier(sde)(0.5, x[0][:, None])
    unet, unet_sde = pf.load_pretrained("digits-vp")
    with pytest.raises(ValueError, match=r"x must be one example of shape \(8, 8, 1\).*got "
                                         r"shape \(8, 8, 1, 1\)"):
        pf.log_likelihood(unet, unet_sde, jnp.zeros((2, 8, 8, 1, 1)), key=jax.random.key(1))


def _dataset(images, num_bins):
    return pf.data.Dataset(name="t", split="train", images=images,
                           labels=np.zeros(len(images), np.int32), num_bins=num_bins)


@pytest.mark.parametrize("images, num_bins, match", [
    (np.full((2, 3), 300), 16, r"levels in \[0, num_bins\) = \[0, 16\), got values in \[300, "
                               r"300\]"),
    (np.full((2, 3), -1), 16, r"got values in \[-1, -1\]"),
    (np.full((2, 3), 16), 16, r"got values in \[16, 16\]"),
    (np.full((2, 3), 0.5), 16, "images must be integers"),
    (np.zeros((2, 3), int), 17.9, r"num_bins must be an integer in \[2, 2\*\*24\], got 17.9"),
    (np.zeros((2, 3), int), 17.0, "got 17.0"),
    (np.zeros((2, 3), int), True, "got True"),
    (np.zeros((2, 3), int), 2**40, r"num_bins must be an integer in \[2, 2\*\*24\].*got "
                                   r"1099511627776"),
    (np.zeros((2, 3), int), 1, "got 1"),
])
def test_dataset_checks_levels_against_num_bins(images, num_bins, match):
    with pytest.raises(ValueError, match=match):
        _dataset(images, num_bins)


def test_dataset_accepts_the_edges_and_integer_arrays():
    ds = _dataset(np.array([[0, 15]]), np.int64(16))
    assert ds.num_bins == 16 and type(ds.num_bins) is int
    assert _dataset(np.array([[0, 2**24 - 1]]), 2**24).num_bins == 2**24
    with pytest.raises(ValueError, match="num_bins must be an integer"):
        pf.data.from_arrays(np.zeros((2, 3), int), num_bins=17.9)


def test_bits_per_dim_num_bins_overflow_is_a_value_error():
    unet, sde = pf.load_pretrained("digits-vp")
    x = np.zeros((1, 8, 8, 1), np.int32)
    with pytest.raises(ValueError, match=r"num_bins must be an integer in \[2, 2\*\*24\]"):
        pf.bits_per_dim(unet, sde, x, key=jax.random.key(0), num_bins=2**40)
    with pytest.raises(ValueError, match=r"num_bins must be an integer in \[2, 2\*\*24\]"):
        pf.train_classifier(np.zeros((2, 3), np.int32), np.zeros(2, np.int32), num_bins=2**40)
    from probflow._baselines import categorical_bpd

    with pytest.raises(ValueError, match=r"num_bins must be an integer in \[2, 2\*\*24\]"):
        categorical_bpd(np.zeros((2, 3), int), np.zeros((2, 3), int), 2**40)
    # log2(2) bits per pixel for two bins seen equally often (the pseudocount's estimate).
    x = np.array([[0, 1], [1, 0]])
    assert categorical_bpd(x, x, 2) == pytest.approx(1.0)


def test_load_npz_num_bins(tmp_path):
    images = np.zeros((2, 4), np.int32)
    for value, match in [(17.9, r"float64 and shape \(\) \(17.9\)"),
                         (np.array([17, 17]), r"shape \(2,\)"), (2**40, "2\\*\\*24")]:
        np.savez(tmp_path / "d.npz", images=images, num_bins=value)
        with pytest.raises(ValueError, match=match):
            pf.data.load(f"npz:{tmp_path / 'd.npz'}", "train")
    np.savez(tmp_path / "d.npz", images=images, num_bins=np.int16(17))
    assert pf.data.load(f"npz:{tmp_path / 'd.npz'}", "train").num_bins == 17


def test_nan_in_training_data_is_named_not_blamed_on_the_learning_rate():
    sde = pf.VPSDE()
    model = pf.models.MLP(2, sde=sde, width=8, depth=1, key=jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    x[[3, 9], 1] = np.nan
    x[12, 0] = np.inf
    config = pf.TrainConfig(steps=2, batch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match=r"data holds NaN or inf values in 3 of 16 examples "
                                         r"\(first: example 3\)"):
        pf.train(model, sde, x, config, progress=False)
    x[[3, 9, 12]] = 0.0
    assert pf.train(model, sde, x, config, progress=False).step == 2
