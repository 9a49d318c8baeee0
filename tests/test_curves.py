"""NFE-versus-quality curves on a mixture: errors shrink with effort, checked independently."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import probflow as pf
from probflow._curves import (
    ODESweep,
    StochasticSweep,
    format_rows,
    likelihood_curve,
    nfe_curve,
    plot_nfe_curve,
    save_image_grid,
)


def test_nfe_curve_on_mixture(mixture2d, tmp_path):
    sde = pf.VPSDE()
    model = mixture2d.score_model(sde)
    data = mixture2d.sample(jax.random.key(9), 1500)
    rows = nfe_curve(
        model, sde, (2,), key=jax.random.key(0), num_samples=300,
        ode_sweeps=[
            ODESweep(label="heun", solver=diffrax.Heun(), steps=(4, 16)),
            ODESweep(label="tsit5", solver=diffrax.Tsit5(), tolerances=(1e-2, 1e-4)),
        ],
        stochastic_sweeps=[StochasticSweep(label="reverse-sde", kind="sde", steps=(100,))],
        reference_data=data,
    )
    by = {(r["sampler"], r["setting"]): r for r in rows}
    heun4, heun16 = by[("ode-heun", "steps=4")], by[("ode-heun", "steps=16")]
    assert heun4["nfe_mean"] == 8 and heun16["nfe_mean"] == 32
    # Heun is second order: 4x the steps cuts the error by roughly 16x (at least 6x here).
    assert heun16["solver_error"] < heun4["solver_error"] / 6
    t2, t4 = by[("ode-tsit5", "tol=0.01")], by[("ode-tsit5", "tol=0.0001")]
    assert t4["solver_error"] < t2["solver_error"] and t4["nfe_mean"] > t2["nfe_mean"]
    # The reference solve samples the mixture: its distance to data is at the exact-vs-exact level.
    exact = float(pf.sliced_wasserstein(mixture2d.sample(jax.random.key(1), 300), data,
                                        key=jax.random.key(2)))
    ref = by[("reference (dopri8)", "tol=1e-07")]["sliced_wasserstein"]
    assert ref < 2.5 * exact + 0.02
    assert by[("reverse-sde", "steps=100")]["nfe_mean"] == 100
    plot_nfe_curve(rows, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size[0] > 100
    assert "ode-heun" in format_rows(rows, ["sampler", "setting", "nfe_mean"])


def test_likelihood_curve_error_shrinks():
    gm = pf.GaussianMixture([1.0], [[0.2, -0.1]], [np.eye(2) * 0.5])
    sde = pf.VPSDE()
    x_int = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 2)))
    rows = likelihood_curve(
        gm.score_model(sde), sde, x_int, key=jax.random.key(0), num_bins=256,
        data_range=(-3.0, 3.0),
        sweeps=[ODESweep(label="tsit5", solver=diffrax.Tsit5(), tolerances=(1e-2, 1e-5))],
    )
    errs = [r["bpd_error"] for r in rows[1:]]
    assert errs[1] < errs[0] and errs[1] < 1e-3


def test_image_grid(tmp_path):
    imgs = jnp.linspace(0, 1, 5 * 8 * 8).reshape(5, 8, 8, 1)
    save_image_grid(tmp_path / "g.png", imgs, scale=2)
    im = Image.open(tmp_path / "g.png")
    # 3 columns x 2 rows of 8x8 with 1-pixel padding, scaled 2x.
    assert im.size == ((3 * 9 + 1) * 2, (2 * 9 + 1) * 2)
    with pytest.raises(ValueError, match="images must have shape"):
        save_image_grid(tmp_path / "h.png", jnp.zeros((2, 8, 8, 2)))
