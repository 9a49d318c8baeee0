"""`probflow bpd` with the likelihood toolkit: --method elbo, --dequantization,
--importance-samples, and the solver's estimated bias printed by default (its numbers are the
library's, `pf.estimate_solver_bias` / `pf.bits_per_dim`, with the documented keys)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny MLP on the digits shape (the plumbing is tested, not the quality)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.eqx"
    sde = pf.VPSDE()
    model = pf.models.MLP((8, 8, 1), sde=sde, width=32, depth=1, key=jax.random.key(0))
    pf.save_checkpoint(path, model, sde, None, num_bins=17, data_range=(0.0, 1.0), data="digits")
    return str(path)


def test_bpd_prints_the_solver_bias_and_takes_the_new_options(tiny_checkpoint, tmp_path, capsys):
    from probflow._cli import main

    js = tmp_path / "bpd.json"
    assert main(["bpd", "--checkpoint", tiny_checkpoint, "--data", "digits", "--limit", "4",
                 "--rtol", "1e-3", "--atol", "1e-3", "--check-solver", "3", "--seed", "2",
                 "--dequantization", "truncated_normal", "--importance-samples", "2",
                 "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "solver bias" in out and "estimated bias of the mean" in out
    res = json.loads(js.read_text())
    model, sde, _ = pf.load_checkpoint(tiny_checkpoint)
    images = pf.data.load("digits", "test").images[:4]
    opts = dict(num_bins=17, rtol=1e-3, atol=1e-3, trace="rademacher", num_probes=1,
                dequantization=pf.TruncatedNormalDequantization(), importance_samples=2)
    key = jax.random.key(2)
    # Image i draws from fold_in(fold_in(key, repeat 0), i).
    keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, 0), i) for i in range(4)])
    r = pf.bits_per_dim(model, sde, images, key=keys, **opts)
    np.testing.assert_allclose(res["bpd"], float(np.mean(np.asarray(r.bpd, np.float64))),
                               rtol=1e-5)
    # The check: 3 images chosen with fold_in(key, repeats=1), solved again at 1e-5 with the same
    # draws, paired with their values above.
    idx = np.sort(np.asarray(jax.random.choice(jax.random.fold_in(key, 1), 4, (3,),
                                               replace=False)))
    tight = pf.bits_per_dim(model, sde, images[idx], key=keys[idx],
                            **{**opts, "rtol": 1e-5, "atol": 1e-5})
    bias = np.mean(np.asarray(r.bpd, np.float64)[idx] - np.asarray(tight.bpd, np.float64))
    np.testing.assert_allclose(res["solver_bias"], bias, rtol=1e-4, atol=1e-6)
    assert res["solver_check"]["nfe_tight_mean"] == float(np.mean(tight.nfe))
    assert res["solver_check"]["num_images"] == 3 and res["importance_samples"] == 2
    assert np.mean(np.asarray(r.nfe)) > 0 and res["nfe_mean"] == float(np.mean(r.nfe))

    assert main(["bpd", "--checkpoint", tiny_checkpoint, "--data", "digits", "--limit", "3",
                 "--method", "elbo", "--elbo-times", "8", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["method"] == "elbo" and res["solver_bias"] is None
    assert res["nfe_mean"] == 8 + 16 and np.isfinite(res["bpd"])
    assert main(["bpd", "--checkpoint", tiny_checkpoint, "--data", "digits", "--limit", "3",
                 "--method", "elbo", "--elbo-times", "7"]) != 0
