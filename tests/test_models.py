import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import correlate2d

import probflow as pf
from probflow.models import MLP, UNet
from probflow.models._unet import Conv2d, GroupNorm

_call = eqx.filter_jit(lambda m, t, x: m(t, x))


@pytest.fixture(scope="module")
def small_unet():
    return UNet((8, 8, 1), sde=pf.VPSDE(), channels=(8, 16), key=jax.random.key(0))


def test_conv_matches_scipy_reference():
    conv = Conv2d(2, 3, 3, key=jax.random.key(1))
    conv = eqx.tree_at(lambda c: c.bias, conv, jnp.arange(3.0))
    x = np.asarray(jax.random.normal(jax.random.key(2), (5, 6, 2)))
    w = np.asarray(conv.weight)  # HWIO
    ref = np.stack(
        [sum(correlate2d(x[..., i], w[..., i, o], mode="same") for i in range(2)) + o
         for o in range(3)], axis=-1)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    strided = Conv2d(2, 3, 3, stride=2, key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(strided(jnp.asarray(x))), ref[::2, ::2] - np.arange(3),
                               rtol=1e-5, atol=1e-5)


def test_group_norm_normalises_groups():
    gn = GroupNorm(16, layout="NHWC")
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 4, 16))
    y = np.asarray(gn(x)).reshape(4, 4, gn.groups, -1)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 3)), 1.0, atol=1e-3)


def test_layouts_compute_the_same_function():
    x = jax.random.uniform(jax.random.key(3), (8, 8, 1))
    out = {}
    for layout in ("NHWC", "NCHW"):
        m = UNet(sde=pf.VPSDE(), channels=(8, 16), layout=layout, key=jax.random.key(0))
        # give the zero-initialised output layers weight, so the whole net matters
        m = jax.tree.map(lambda a: a + 0.05 if eqx.is_inexact_array(a) else a, m)
        out[layout] = np.asarray(_call(m, 0.3, x))
    assert np.abs(out["NHWC"]).max() > 1e-2
    np.testing.assert_allclose(out["NHWC"], out["NCHW"], rtol=2e-4, atol=2e-4)


def test_score_is_minus_network_over_std(small_unet):
    m = small_unet
    x = jax.random.uniform(jax.random.key(4), (8, 8, 1))
    t = 0.37
    scale, std = pf.VPSDE().marginal(t)
    c_in = 1.0 / np.sqrt(scale**2 * 0.25 + std**2)
    ref = -np.asarray(m.network(jnp.log(std), c_in * x, key=None)) / std
    np.testing.assert_allclose(np.asarray(_call(m, t, x)), ref, rtol=1e-5, atol=1e-6)


def test_output_shapes_and_time_dependence(small_unet):
    x = jax.random.uniform(jax.random.key(5), (8, 8, 1))
    m = jax.tree.map(lambda a: a + 0.05 if eqx.is_inexact_array(a) else a, small_unet)
    s1, s2 = _call(m, 1e-5, x), _call(m, 0.5, x)
    assert s1.shape == (8, 8, 1) and np.all(np.isfinite(s1))
    assert not np.allclose(np.asarray(s1) * 1e-3, np.asarray(s2) * pf.VPSDE().marginal(0.5)[1])
    batch = eqx.filter_jit(jax.vmap(m))(jnp.array([0.1, 0.2]), jnp.stack([x, x]))
    assert batch.shape == (2, 8, 8, 1)
    mlp = MLP(3, sde=pf.VESDE(), width=16, depth=2, key=jax.random.key(0))
    assert mlp(0.2, jnp.ones(3)).shape == (3,)


def test_wrong_shape_and_bad_hyperparameters(small_unet):
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\)"):
        small_unet(0.5, jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="layout"):
        UNet(sde=pf.VPSDE(), layout="CHWN", key=jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        UNet((6, 6, 1), sde=pf.VPSDE(), channels=(8, 8, 8), key=jax.random.key(0))
    with pytest.raises(ValueError, match="width"):
        MLP(2, sde=pf.VPSDE(), width=0, key=jax.random.key(0))


def test_fourier_frequencies_are_not_trained(small_unet):
    x = jax.random.uniform(jax.random.key(6), (8, 8, 1))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: jnp.sum(m(0.3, x) ** 2)))(small_unet)
    assert float(jnp.abs(grads.embed.frequencies).max()) == 0.0
    assert float(jnp.abs(grads.conv_in.weight).max()) > 0.0


def test_jvp_matches_finite_differences(small_unet):
    m = jax.tree.map(lambda a: a + 0.05 if eqx.is_inexact_array(a) else a, small_unet)
    x = jax.random.uniform(jax.random.key(7), (8, 8, 1))
    v = jax.random.normal(jax.random.key(8), (8, 8, 1))
    f = lambda x: _call(m, 0.5, x)
    _, jv = eqx.filter_jit(jax.jvp)(lambda x: m(0.5, x), (x,), (v,))
    h = 1e-2
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    np.testing.assert_allclose(np.asarray(jv), np.asarray(fd), rtol=2e-2, atol=2e-2)


def test_deep_unet_has_enough_keys():
    """Issue 11: a fixed pool of 64 keys ran out (StopIteration) for deep or many-level nets."""
    m = UNet((32, 32, 1), sde=pf.VPSDE(), channels=(4,) * 5, num_res_blocks=5, dropout=0.1,
             key=jax.random.key(0))
    blocks = [b for level in (*m.down, (m.mid[0], m.mid[2]), *m.up) for b in level]
    assert len(blocks) == 5 * 5 + 2 + 5 * 6
    # every block got its own initial weights (no key reused)
    firsts = {float(b.conv1.weight.ravel()[0]) for b in blocks}
    assert len(firsts) == len(blocks)
    # the forward pass draws one dropout key per block (traced only: compiling it is slow)
    out = eqx.filter_eval_shape(lambda m, x, k: m(0.3, x, key=k), m, jnp.zeros((32, 32, 1)),
                                jax.random.key(2))
    assert out.shape == (32, 32, 1)
