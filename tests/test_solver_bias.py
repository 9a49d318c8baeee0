"""`evaluate_bits_per_dim(check_solver=N)`: the solver's estimated bias of the mean.

Reference: on a 2-d mixture with its exact score and the exact trace, the bias of a loose solve
(rtol = atol = 1e-2) on the whole image set, measured directly against a solve 1e4x tighter with
the same draws, must be what the estimate from N images (paired re-solves at 100x tighter) says,
within its standard error; and at the shipped defaults the estimate is small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probflow as pf

BINS, LO, HI = 32, -3.0, 3.0
GM = pf.GaussianMixture(
    [0.4, 0.6], [[-1.0, 0.8], [1.0, -0.5]], [np.eye(2) * 0.2, [[0.3, 0.1], [0.1, 0.25]]]
)
COMMON = dict(num_bins=BINS, data_range=(LO, HI), trace="exact")


def test_solver_bias_estimate_matches_the_direct_measurement():
    sde = pf.SubVPSDE()
    model = GM.score_model(sde)
    x = GM.sample(jax.random.key(0), 32)
    x_int = jnp.clip(jnp.floor((x - LO) / (HI - LO) * BINS), 0, BINS - 1).astype(jnp.int32)
    loose = dict(rtol=1e-2, atol=1e-2, **COMMON)
    ev = pf.evaluate_bits_per_dim(model, sde, x_int, key=jax.random.key(1), check_solver=12,
                                  **loose)
    key = jax.random.key(2)
    a = pf.bits_per_dim(model, sde, x_int, key=key, **loose)
    b = pf.bits_per_dim(model, sde, x_int, key=key, **{**loose, "rtol": 1e-6, "atol": 1e-6})
    direct = float(np.mean(np.asarray(a.bpd, np.float64) - np.asarray(b.bpd, np.float64)))
    assert abs(direct) > 1e-3  # the loose solve is visibly biased
    assert ev.solver.num_images == 12 and ev.solver_bias_se > 0
    assert abs(ev.solver_bias - direct) < 3 * ev.solver_bias_se + 0.1 * abs(direct), (
        ev.solver_bias, ev.solver_bias_se, direct)
    assert np.all(ev.solver.nfe_tight > ev.solver.nfe)
    # At bits_per_dim's default tolerances the bias is below a tenth of the statistical error.
    ev0 = pf.evaluate_bits_per_dim(model, sde, x_int, key=jax.random.key(1), check_solver=8,
                                   **COMMON)
    assert abs(ev0.solver_bias) < 0.1 * ev0.summary.sem, (ev0.solver_bias, ev0.summary.sem)
    with pytest.raises(ValueError, match="check_solver"):
        pf.evaluate_bits_per_dim(model, sde, x_int, key=key, check_solver=0, **COMMON)
    with pytest.raises(ValueError, match="adaptive"):
        pf.estimate_solver_bias(model, sde, x_int, key=key, num_images=2, steps=4, **COMMON)
