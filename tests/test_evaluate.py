"""`pf.evaluate_bits_per_dim`: probes and repeats at the library level, on a mixture whose density
is known in closed form.

The truth of each quantised image is its expected bits/dim over the dequantization noise,
E_u[-log2 p_eps(x + u) / D] (closed form at many draws of u). The evaluation's error against it
holds dequantization and probe noise only (the solver error is far smaller at rtol = 1e-4), and
the summary's estimates of both noises must predict how far the mean lands from the truth, for
one repeat and for four (where the error must halve).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf

BINS, LO, HI = 32, -3.0, 3.0
GM = pf.GaussianMixture(
    [0.4, 0.6], [[-1.0, 0.8], [1.0, -0.5]], [np.eye(2) * 0.2, [[0.3, 0.1], [0.1, 0.25]]]
)
OPTIONS = dict(num_bins=BINS, data_range=(LO, HI), rtol=1e-4, atol=1e-4)


def _quantise(x):
    return jnp.clip(jnp.floor((x - LO) / (HI - LO) * BINS), 0, BINS - 1).astype(jnp.int32)


def _truth(sde, x_int, draws=4096):
    """E_u[bits/dim] of every image, by the closed-form density at `draws` dequantizations."""
    u = jax.random.uniform(jax.random.key(99), (draws,) + x_int.shape)
    x = LO + (HI - LO) * (x_int[None] + u) / BINS
    logp = jax.vmap(lambda xi: GM.log_prob(xi, sde, 1e-5))(x)  # [draws, N]
    d = x_int.shape[-1]
    bpd = -(logp + d * math.log((HI - LO) / BINS)) / (d * math.log(2))
    return np.asarray(bpd.mean(0), np.float64)


def test_repeats_and_probes_use_the_cli_keys():
    sde = pf.VPSDE()
    model = GM.score_model(sde)
    x_int = _quantise(GM.sample(jax.random.key(0), 10))
    key = jax.random.key(1)
    ev = pf.evaluate_bits_per_dim(model, sde, x_int, key=key, num_probes=2, repeats=2,
                                  batch_size=5, **OPTIONS)
    assert len(ev.results) == 2 and ev.results[0].bpd_probes.shape == (10, 2)
    for r in range(2):
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, r), i) for i in range(10)])
        for i in (0, 5):  # image i draws from fold_in(fold_in(key, r), i)
            one = pf.bits_per_dim(model, sde, x_int[i : i + 5], num_probes=2,
                                  key=keys[i : i + 5], **OPTIONS)
            np.testing.assert_array_equal(np.asarray(ev.results[r].bpd_probes[i : i + 5]),
                                          np.asarray(one.bpd_probes))
    s = pf.summarize_bits_per_dim(list(ev.results))
    assert ev.summary == s and (s.num_repeats, s.num_probes, s.num_images) == (2, 2, 10)
    np.testing.assert_allclose(ev.bpd, np.mean([np.asarray(r.bpd) for r in ev.results], 0))
    assert ev.nfe.shape == (2, 10) and np.all(ev.nfe > 0)
    with pytest.raises(ValueError, match="repeats"):
        pf.evaluate_bits_per_dim(model, sde, x_int, key=key, repeats=0, **OPTIONS)


def test_error_bars_shrink_as_predicted_against_the_truth():
    sde = pf.VPSDE()
    model = GM.score_model(sde)
    n, m = 8, 40  # 8 images, 40 independent evaluations of them (tiled into one batch)
    x_int = _quantise(GM.sample(jax.random.key(2), n))
    truth = _truth(sde, x_int).mean()
    tiled = jnp.tile(x_int, (m, 1))
    errors, noise = {}, {}
    for repeats in (1, 4):
        ev = pf.evaluate_bits_per_dim(model, sde, tiled, key=jax.random.key(3 + repeats),
                                      num_probes=2, repeats=repeats, **OPTIONS)
        per_run = ev.bpd.reshape(m, n).mean(1)  # each evaluation's test-set mean
        errors[repeats] = per_run - truth
        if repeats == 4:
            s = ev.summary  # dequantization and probe noise, pooled over all 320 images
            assert s.dequantization_noise > 0.02 and s.probe_noise > 0.02
            for r in (1, 4):
                noise[r] = math.sqrt(s.dequantization_noise**2 / r
                                     + s.probe_noise**2 / (2 * r)) / math.sqrt(n)
    tol = 3.5 / math.sqrt(2 * (m - 1))  # the relative error of a std from m draws, 3.5 sigma
    for r in (1, 4):
        sd = errors[r].std(ddof=1)
        assert abs(sd / noise[r] - 1) < tol, (r, sd, noise[r])
        # Unbiased: the mean over the 40 evaluations is the truth within 4 of its errors.
        assert abs(errors[r].mean()) < 4 * noise[r] / math.sqrt(m) + 1e-3, (r, errors[r].mean())
    # Four repeats halve the error of the mean.
    ratio = errors[1].std(ddof=1) / errors[4].std(ddof=1)
    assert abs(ratio / 2 - 1) < 1.5 * tol, ratio
