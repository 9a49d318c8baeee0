"""A small U-Net score network in the DDPM++ spirit, sized for 8x8 images on a CPU.

Convolutions use `jax.lax.conv_general_dilated` channels-last (NHWC/HWIO) by default: on CPU,
channels-first convolutions inside diffrax's while loop run several times slower
(jax-ml/jax#12868). `layout="NCHW"` exists so that `benchmarks/train_speed.py` can measure both.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._sde import AbstractSDE
from ._base import AbstractScoreModel, Dense, GaussianFourierFeatures, check_positive_int

_LAYOUTS = ("NHWC", "NCHW")


def _channel_axis(layout: str) -> int:
    return -1 if layout == "NHWC" else 0


class Conv2d(eqx.Module):
    """A 2-d convolution of one image in `layout` ("NHWC": [H, W, C]; "NCHW": [C, H, W])."""

    weight: Array  # HWIO for NHWC, OIHW for NCHW
    bias: Array
    stride: int = eqx.field(static=True)
    layout: str = eqx.field(static=True)

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        stride: int = 1,
        layout: str = "NHWC",
        init_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        fan_in = c_in * kernel * kernel
        bound = init_scale * math.sqrt(3.0 / fan_in)
        w = jax.random.uniform(key, (kernel, kernel, c_in, c_out), minval=-bound, maxval=bound)
        self.weight = w if layout == "NHWC" else jnp.transpose(w, (3, 2, 0, 1))
        self.bias = jnp.zeros((c_out,))
        self.stride = stride
        self.layout = layout

    def __call__(self, x: Array) -> Array:
        k = self.weight.shape[0] if self.layout == "NHWC" else self.weight.shape[-1]
        pad = (k - 1) // 2
        if self.layout == "NHWC":
            dims = ("NHWC", "HWIO", "NHWC")
            bias = self.bias
        else:
            dims = ("NCHW", "OIHW", "NCHW")
            bias = self.bias[:, None, None]
        y = jax.lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=dims,
        )[0]
        return y + bias


class GroupNorm(eqx.Module):
    """Group normalisation of one image, with a per-channel affine map."""

    scale: Array
    offset: Array
    groups: int = eqx.field(static=True)
    layout: str = eqx.field(static=True)

    def __init__(self, channels: int, *, layout: str):
        self.groups = math.gcd(channels, min(8, max(1, channels // 4)))
        self.scale = jnp.ones((channels,))
        self.offset = jnp.zeros((channels,))
        self.layout = layout

    def __call__(self, x: Array) -> Array:
        if self.layout == "NHWC":
            h, w, c = x.shape
            g = x.reshape(h, w, self.groups, c // self.groups)
            mean = g.mean(axis=(0, 1, 3), keepdims=True)
            var = g.var(axis=(0, 1, 3), keepdims=True)
            y = ((g - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(h, w, c)
            return y * self.scale + self.offset
        c, h, w = x.shape
        g = x.reshape(self.groups, c // self.groups, h, w)
        mean = g.mean(axis=(1, 2, 3), keepdims=True)
        var = g.var(axis=(1, 2, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(c, h, w)
        return y * self.scale[:, None, None] + self.offset[:, None, None]


def _add_channels(x: Array, v: Array, layout: str) -> Array:
    return x + (v if layout == "NHWC" else v[:, None, None])


class ResidualBlock(eqx.Module):
    """GroupNorm-SiLU-conv twice, with the noise-level embedding added in between."""

    norm1: GroupNorm
    conv1: Conv2d
    emb: Dense
    norm2: GroupNorm
    conv2: Conv2d
    skip: Conv2d | None
    dropout: float = eqx.field(static=True)
    layout: str = eqx.field(static=True)

    def __init__(self, c_in, c_out, emb_dim, *, dropout, layout, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm(c_in, layout=layout)
        self.conv1 = Conv2d(c_in, c_out, 3, layout=layout, key=k1)
        self.emb = Dense(emb_dim, c_out, key=k2)
        self.norm2 = GroupNorm(c_out, layout=layout)
        self.conv2 = Conv2d(c_out, c_out, 3, layout=layout, init_scale=1e-5, key=k3)
        self.skip = None if c_in == c_out else Conv2d(c_in, c_out, 1, layout=layout, key=k4)
        self.dropout = dropout
        self.layout = layout

    def __call__(self, x, emb, *, key):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = _add_channels(h, self.emb(emb), self.layout)
        h = jax.nn.silu(self.norm2(h))
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
        h = self.conv2(h)
        skip = x if self.skip is None else self.skip(x)
        return (skip + h) / math.sqrt(2.0)


class SelfAttention(eqx.Module):
    """Single-head self-attention over the pixels of one image, with a residual connection."""

    norm: GroupNorm
    qkv: Dense
    proj: Dense
    layout: str = eqx.field(static=True)

    def __init__(self, channels, *, layout, key):
        k1, k2 = jax.random.split(key)
        self.norm = GroupNorm(channels, layout=layout)
        self.qkv = Dense(channels, 3 * channels, key=k1)
        self.proj = Dense(channels, channels, key=k2, init_scale=1e-5)
        self.layout = layout

    def __call__(self, x):
        h = self.norm(x)
        if self.layout == "NCHW":
            h = jnp.moveaxis(h, 0, -1)
        hh, ww, c = h.shape
        q, k, v = jnp.split(self.qkv(h.reshape(hh * ww, c)), 3, axis=-1)
        attn = jax.nn.softmax(q @ k.T / math.sqrt(c), axis=-1)
        out = self.proj(attn @ v).reshape(hh, ww, c)
        if self.layout == "NCHW":
            out = jnp.moveaxis(out, -1, 0)
        return (x + out) / math.sqrt(2.0)


def _num_blocks(levels: int, num_res_blocks: int) -> int:
    """Residual blocks in a UNet: down, the two in the middle, up (one more per level)."""
    return levels * num_res_blocks + 2 + levels * (num_res_blocks + 1)


class UNet(AbstractScoreModel):
    """Two resolution levels (e.g. 8x8 and 4x4), residual blocks, attention at the lowest one.

    `x` is one image [H, W, C] (channels last, whatever `layout` is used inside).
    """

    sde: AbstractSDE
    shape: tuple[int, ...] = eqx.field(static=True)
    channels: tuple[int, ...] = eqx.field(static=True)
    num_res_blocks: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    fourier_scale: float = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    layout: str = eqx.field(static=True)
    embed: GaussianFourierFeatures
    embed_mlp: tuple[Dense, Dense]
    conv_in: Conv2d
    down: tuple[tuple[ResidualBlock, ...], ...]
    downsample: tuple[Conv2d, ...]
    mid: tuple[ResidualBlock, SelfAttention, ResidualBlock]
    up: tuple[tuple[ResidualBlock, ...], ...]
    upsample: tuple[Conv2d, ...]
    norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(
        self,
        shape=(8, 8, 1),
        *,
        sde: AbstractSDE,
        channels=(32, 64),
        num_res_blocks: int = 1,
        dropout: float = 0.0,
        fourier_scale: float = 1.0,
        sigma_data: float = 0.5,
        layout: str = "NHWC",
        key: PRNGKeyArray,
    ):
        shape = tuple(int(s) for s in shape)
        channels = tuple(int(c) for c in channels)
        if len(shape) != 3 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be (H, W, C) with positive ints, got {shape!r}")
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels}")
        factor = 2 ** (len(channels) - 1)
        if shape[0] % factor or shape[1] % factor:
            raise ValueError(
                f"shape {shape} has H and W not divisible by 2^(len(channels) - 1) = {factor}"
            )
        check_positive_int(num_res_blocks, "num_res_blocks")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.sde = sde
        self.shape = shape
        self.channels = channels
        self.num_res_blocks = num_res_blocks
        self.dropout = float(dropout)
        self.fourier_scale = float(fourier_scale)
        self.sigma_data = float(sigma_data)
        self.layout = layout

        levels = len(channels)
        # embedding (3), conv_in, blocks, down- and upsampling convs, attention, conv_out
        n_keys = 4 + _num_blocks(levels, num_res_blocks) + 2 * (levels - 1) + 2
        keys = iter(jax.random.split(key, n_keys))
        c0 = channels[0]
        emb_dim = 4 * c0
        self.embed = GaussianFourierFeatures(2 * c0, self.fourier_scale, key=next(keys))
        self.embed_mlp = (
            Dense(2 * c0, emb_dim, key=next(keys)),
            Dense(emb_dim, emb_dim, key=next(keys)),
        )
        block = lambda ci, co: ResidualBlock(
            ci, co, emb_dim, dropout=self.dropout, layout=layout, key=next(keys)
        )
        self.conv_in = Conv2d(shape[-1], c0, 3, layout=layout, key=next(keys))
        skips = [c0]
        down, downsample = [], []
        c = c0
        for level, ch in enumerate(channels):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(c, ch))
                c = ch
                skips.append(c)
            down.append(tuple(blocks))
            if level < len(channels) - 1:
                downsample.append(Conv2d(c, c, 3, stride=2, layout=layout, key=next(keys)))
                skips.append(c)
        self.down = tuple(down)
        self.downsample = tuple(downsample)
        self.mid = (block(c, c), SelfAttention(c, layout=layout, key=next(keys)), block(c, c))
        up, upsample = [], []
        for level in reversed(range(len(channels))):
            ch = channels[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(c + skips.pop(), ch))
                c = ch
            up.append(tuple(blocks))
            if level > 0:
                upsample.append(Conv2d(c, c, 3, layout=layout, key=next(keys)))
        self.up = tuple(up)
        self.upsample = tuple(upsample)
        self.norm_out = GroupNorm(c, layout=layout)
        self.conv_out = Conv2d(c, shape[-1], 3, layout=layout, init_scale=1e-5, key=next(keys))

    def __check_init__(self):
        if not isinstance(self.sde, AbstractSDE):
            raise ValueError(f"sde must be a probflow SDE, got {type(self.sde).__name__}")

    @property
    def hyperparameters(self) -> dict:
        return dict(
            shape=list(self.shape),
            channels=list(self.channels),
            num_res_blocks=self.num_res_blocks,
            dropout=self.dropout,
            fourier_scale=self.fourier_scale,
            sigma_data=self.sigma_data,
            layout=self.layout,
        )

    def network(self, c_noise: Array, x: Array, *, key: PRNGKeyArray | None) -> Array:
        n = _num_blocks(len(self.channels), self.num_res_blocks)
        keys = iter([None] * n if key is None else list(jax.random.split(key, n)))
        cat_axis = _channel_axis(self.layout)
        emb = self.embed(c_noise)
        emb = self.embed_mlp[1](jax.nn.silu(self.embed_mlp[0](emb)))
        emb = jax.nn.silu(emb)
        if self.layout == "NCHW":
            x = jnp.moveaxis(x, -1, 0)
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, emb, key=next(keys))
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid[0](h, emb, key=next(keys))
        h = self.mid[1](h)
        h = self.mid[2](h, emb, key=next(keys))
        for i, blocks in enumerate(self.up):
            for blk in blocks:
                h = blk(jnp.concatenate([h, hs.pop()], axis=cat_axis), emb, key=next(keys))
            if i < len(self.upsample):
                sp = (0, 1) if self.layout == "NHWC" else (1, 2)
                h = jnp.repeat(jnp.repeat(h, 2, axis=sp[0]), 2, axis=sp[1])
                h = self.upsample[i](h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        if self.layout == "NCHW":
            h = jnp.moveaxis(h, 0, -1)
        return h
