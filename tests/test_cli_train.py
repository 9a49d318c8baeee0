import json

import jax
import numpy as np
import pytest

import probflow as pf
from probflow._cli import main

TRAIN = ["train", "--data", "digits", "--sde", "vp", "--model", "mlp", "--width", "16",
         "--depth", "1", "--batch-size", "16", "--checkpoint-every", "10", "--seed", "1",
         "--no-progress"]


def test_train_resume_and_bpd(tmp_path, capsys):
    assert main(TRAIN + ["--steps", "20", "--out", str(tmp_path / "a")]) == 0
    assert main(TRAIN + ["--steps", "10", "--out", str(tmp_path / "b")]) == 0
    assert main(TRAIN + ["--steps", "20", "--out", str(tmp_path / "b"), "--resume"]) == 0
    ma, _, ca = pf.load_checkpoint(tmp_path / "a" / "checkpoint.eqx")
    mb, _, cb = pf.load_checkpoint(tmp_path / "b" / "checkpoint.eqx")
    assert ca["step"] == cb["step"] == 20 and ca["num_bins"] == 17
    for x, y in zip(jax.tree.leaves(ma), jax.tree.leaves(mb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    js = tmp_path / "bpd.json"
    assert main(["bpd", "--checkpoint", str(tmp_path / "a" / "checkpoint.eqx"), "--data",
                 "digits", "--split", "test", "--limit", "3", "--rtol", "1e-3", "--atol",
                 "1e-3", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out
    res = json.loads(js.read_text())
    # Independently: pf.bits_per_dim on the same images with the CLI's documented keys.
    ds = pf.data.load("digits", "test")
    # Image i draws from fold_in(fold_in(key(seed), repeat 0), i).
    key = jax.numpy.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), i)
                           for i in range(3)])
    ref = pf.bits_per_dim(ma, pf.VPSDE(), ds.images[:3], key=key, num_bins=17, rtol=1e-3,
                          atol=1e-3, trace="rademacher")  # the CLI's default estimator
    np.testing.assert_allclose(res["bpd"], float(np.mean(ref.bpd)), rtol=1e-5)
    assert res["nfe_max"] == int(np.max(ref.nfe)) and res["num_images"] == 3
    assert res["bpd_se"] > 0 and "nfe_mean" in res


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--data", "digits", "--sde", "vp", "--steps", "0", "--out", "X"],
         "--steps: expected a positive integer"),
        (["train", "--data", "nope", "--sde", "vp", "--steps", "5", "--out", "X"],
         "unknown dataset 'nope'"),
        (["train", "--data", "digits", "--sde", "vp", "--steps", "5", "--lr", "-1", "--out", "X"],
         "--lr: expected a positive number"),
        (["bpd", "--checkpoint", "missing.eqx", "--data", "digits"], "no such file"),
        (["train", "--data", "digits", "--sde", "vp", "--steps", "5", "--out", "RUN", "--resume"],
         "no checkpoint in"),
    ],
)
def test_user_mistakes_print_one_line(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RUN").mkdir()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    assert main(TRAIN + ["--steps", "5", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and len(err.strip().splitlines()) == 1
