"""DDPM++ / NCSN++ score networks at paper scale (Song et al. 2021, appendix H).

`DDPMpp` follows the official `ncsnpp.py` (score_sde) with `resblock_type="biggan"`: a 4-level
U-Net (channel multipliers (1, 2, 2, 2) at 32, 16, 8, 4 pixels for CIFAR-10) of BigGAN-style
residual blocks that also do the up/downsampling, self-attention at the resolutions in
`attn_resolutions`, GroupNorm with min(C // 4, 32) groups, skip connections rescaled by
1/sqrt(2), dropout, and final convolutions initialised to zero. The two variants differ by:

- DDPM++ (`fir=False`, `progressive_input="none"`, `embedding="positional"`): nearest-neighbour
  upsampling and 2x2 average-pool downsampling inside the resampling blocks;
- NCSN++ (`fir=True`, `progressive_input="residual"`, `embedding="fourier"`): FIR-filtered
  resampling with the [1, 3, 3, 1] kernel (StyleGAN2's upfirdn2d), and an input pyramid: the
  image, downsampled by FIR-filtered strided 3x3 convolutions, is added to the features after
  each downsampling block.

What differs from the official code (documented in docs/scaling.md): the network is
conditioned on c_noise = log std(t) (probflow's preconditioning, `AbstractScoreModel`) rather
than on 999 t (DDPM++) or log sigma (NCSN++: the same thing for VE); the positional
embedding therefore embeds 100 * log std(t) (log std spans about [-11.5, 4] for probflow's SDEs,
so this covers DDPM's range of timestep indices); and the input is scaled by c_in instead of
being mapped to [-1, 1]. The layers, their resampling filters and the parameter count are those
of the official architecture (the count is tested against an independent count).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._sde import AbstractSDE
from ._base import AbstractScoreModel, Dense, GaussianFourierFeatures, check_positive_int
from ._unet import Conv2d

_FIR_KERNEL = (1.0, 3.0, 3.0, 1.0)


class GroupNorm32(eqx.Module):
    """GroupNorm of one image [H, W, C] with min(C // 4, 32) groups, eps 1e-6 (as score_sde)."""

    scale: Array
    offset: Array
    groups: int = eqx.field(static=True)

    def __init__(self, channels: int):
        self.groups = max(1, min(channels // 4, 32))
        if channels % self.groups:
            raise ValueError(f"channels {channels} not divisible into {self.groups} groups")
        self.scale = jnp.ones((channels,))
        self.offset = jnp.zeros((channels,))

    def __call__(self, x: Array) -> Array:
        h, w, c = x.shape
        g = x.reshape(h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(0, 1, 3), keepdims=True)
        var = g.var(axis=(0, 1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(h, w, c)
        return y * self.scale + self.offset


def _fir_filter(x: Array, kernel: np.ndarray, *, stride: int, padding, dilation: int = 1):
    """Depthwise 2-d filtering of one image [H, W, C] with a fixed separable kernel."""
    c = x.shape[-1]
    w = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, c)), x.dtype)  # HWIO, I=1
    return jax.lax.conv_general_dilated(
        x[None],
        w,
        window_strides=(stride, stride),
        padding=padding,
        lhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )[0]


def _fir_kernel_2d(factor_gain: float) -> np.ndarray:
    k = np.asarray(_FIR_KERNEL, np.float64)
    k = np.outer(k, k)
    return (k / k.sum() * factor_gain).astype(np.float32)


def fir_downsample(x: Array) -> Array:
    """upfirdn2d(x, k, down=2, pad=(1, 1)) with k = [1, 3, 3, 1] (outer, normalised)."""
    return _fir_filter(x, _fir_kernel_2d(1.0), stride=2, padding=((1, 1), (1, 1)))


def fir_upsample(x: Array) -> Array:
    """upfirdn2d(x, k * 4, up=2, pad=(2, 1)): zero insertion then the [1, 3, 3, 1] filter."""
    # lhs_dilation inserts the zeros; the flipped symmetric kernel is the kernel itself.
    return _fir_filter(x, _fir_kernel_2d(4.0), stride=1, padding=((2, 2), (2, 2)), dilation=2)


def naive_downsample(x: Array) -> Array:
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def naive_upsample(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)


def _timestep_embedding(c: Array, dim: int) -> Array:
    """DDPM's sinusoidal embedding of a scalar (sin half, cos half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / (half - 1))
    arg = c * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


class BigGANBlock(eqx.Module):
    """ResnetBlockBigGANpp: GN-act-(resample)-conv, + Dense(act(temb)), GN-act-dropout-conv,
    skip through a 1x1 conv when the channels change or the block resamples; (x + h) / sqrt 2."""

    norm1: GroupNorm32
    conv1: Conv2d
    emb: Dense
    norm2: GroupNorm32
    conv2: Conv2d
    skip: Conv2d | None
    up: bool = eqx.field(static=True)
    down: bool = eqx.field(static=True)
    fir: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __init__(self, c_in, c_out, emb_dim, *, up=False, down=False, fir, dropout, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm32(c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, key=k1)
        self.emb = Dense(emb_dim, c_out, key=k2)
        self.norm2 = GroupNorm32(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, init_scale=0.0, key=k3)
        needs_skip = c_in != c_out or up or down
        self.skip = Conv2d(c_in, c_out, 1, key=k4) if needs_skip else None
        self.up, self.down, self.fir, self.dropout = bool(up), bool(down), bool(fir), dropout

    def _resample(self, x):
        if self.up:
            return fir_upsample(x) if self.fir else naive_upsample(x)
        if self.down:
            return fir_downsample(x) if self.fir else naive_downsample(x)
        return x

    def __call__(self, x, emb, *, key):
        h = jax.nn.silu(self.norm1(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv1(h) + self.emb(jax.nn.silu(emb))
        h = jax.nn.silu(self.norm2(h))
        if self.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2.0)


class AttnBlock(eqx.Module):
    """AttnBlockpp: single-head self-attention over pixels, NIN q/k/v/out, (x + h) / sqrt 2."""

    norm: GroupNorm32
    q: Dense
    k: Dense
    v: Dense
    out: Dense

    def __init__(self, channels, *, key):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.norm = GroupNorm32(channels)
        self.q = Dense(channels, channels, key=kq)
        self.k = Dense(channels, channels, key=kk)
        self.v = Dense(channels, channels, key=kv)
        self.out = Dense(channels, channels, key=ko, init_scale=0.0)

    def __call__(self, x):
        hh, ww, c = x.shape
        h = self.norm(x).reshape(hh * ww, c)
        q, k, v = self.q(h), self.k(h), self.v(h)
        attn = jax.nn.softmax(q @ k.T / math.sqrt(c), axis=-1)
        out = self.out(attn @ v).reshape(hh, ww, c)
        return (x + out) / math.sqrt(2.0)


class PyramidDownsample(eqx.Module):
    """The input pyramid's downsampling: (FIR blur then) a strided 3x3 convolution."""

    conv: Conv2d
    fir: bool = eqx.field(static=True)

    def __init__(self, c_in, c_out, *, fir, key):
        self.conv = Conv2d(c_in, c_out, 3, stride=2, key=key)
        self.fir = bool(fir)

    def __call__(self, x):
        if not self.fir:
            return self.conv(x)
        # conv_downsample_2d: upfirdn2d(x, k, pad=(2, 2)), then a valid 3x3 conv, stride 2.
        x = _fir_filter(x, _fir_kernel_2d(1.0), stride=1, padding=((2, 2), (2, 2)))
        y = jax.lax.conv_general_dilated(
            x[None], self.conv.weight, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]
        return y + self.conv.bias


class DDPMpp(AbstractScoreModel):
    """DDPM++ / NCSN++ (see the module docstring); `x` one image [H, W, C], channels last.

    `DDPMpp.ddpmpp(shape, sde=..., key=...)` and `DDPMpp.ncsnpp(...)` give the paper's CIFAR-10
    models (`deep=True`: 8 residual blocks per level instead of 4).
    """

    sde: AbstractSDE
    shape: tuple[int, ...] = eqx.field(static=True)
    nf: int = eqx.field(static=True)
    ch_mult: tuple[int, ...] = eqx.field(static=True)
    num_res_blocks: int = eqx.field(static=True)
    attn_resolutions: tuple[int, ...] = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    fir: bool = eqx.field(static=True)
    progressive_input: str = eqx.field(static=True)
    embedding: str = eqx.field(static=True)
    fourier_scale: float = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    embed: GaussianFourierFeatures | None
    embed_mlp: tuple[Dense, Dense]
    conv_in: Conv2d
    down: tuple[tuple[eqx.Module, ...], ...]
    pyramid: tuple[PyramidDownsample, ...]
    mid: tuple[BigGANBlock, AttnBlock, BigGANBlock]
    up: tuple[tuple[eqx.Module, ...], ...]
    norm_out: GroupNorm32
    conv_out: Conv2d

    def __init__(
        self,
        shape=(32, 32, 3),
        *,
        sde: AbstractSDE,
        nf: int = 128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions=(16,),
        dropout: float = 0.1,
        fir: bool = False,
        progressive_input: str = "none",
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        sigma_data: float = 0.5,
        key: PRNGKeyArray,
    ):
        shape = tuple(int(s) for s in shape)
        ch_mult = tuple(int(c) for c in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if len(shape) != 3 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be (H, W, C) with positive ints, got {shape!r}")
        check_positive_int(nf, "nf")
        check_positive_int(num_res_blocks, "num_res_blocks")
        if not ch_mult or any(c <= 0 for c in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {ch_mult}")
        factor = 2 ** (len(ch_mult) - 1)
        if shape[0] % factor or shape[1] % factor:
            raise ValueError(
                f"shape {shape} has H and W not divisible by 2^(len(ch_mult) - 1) = {factor}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if progressive_input not in ("none", "residual"):
            raise ValueError(
                f"progressive_input must be 'none' or 'residual', got {progressive_input!r}"
            )
        if embedding not in ("fourier", "positional"):
            raise ValueError(f"embedding must be 'fourier' or 'positional', got {embedding!r}")
        self.sde = sde
        self.shape = shape
        self.nf = nf
        self.ch_mult = ch_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = attn_resolutions
        self.dropout = float(dropout)
        self.fir = bool(fir)
        self.progressive_input = progressive_input
        self.embedding = embedding
        self.fourier_scale = float(fourier_scale)
        self.sigma_data = float(sigma_data)

        keys = iter(jax.random.split(key, 4 * (len(ch_mult) + 2) * (num_res_blocks + 2) + 16))
        if embedding == "fourier":
            self.embed = GaussianFourierFeatures(2 * nf, self.fourier_scale, key=next(keys))
            embed_dim = 2 * nf
        else:
            self.embed = None
            embed_dim = nf
        emb_dim = 4 * nf
        self.embed_mlp = (
            Dense(embed_dim, emb_dim, key=next(keys)),
            Dense(emb_dim, emb_dim, key=next(keys)),
        )
        block = lambda ci, co, **kw: BigGANBlock(
            ci, co, emb_dim, fir=self.fir, dropout=self.dropout, key=next(keys), **kw
        )
        num_levels = len(ch_mult)
        resolutions = [shape[0] // 2**i for i in range(num_levels)]
        self.conv_in = Conv2d(shape[-1], nf, 3, key=next(keys))
        skips = [nf]
        c = nf
        pyramid_c = shape[-1]
        down, pyramid = [], []
        for level in range(num_levels):
            mods: list[eqx.Module] = []
            for _ in range(num_res_blocks):
                out = nf * ch_mult[level]
                mods.append(block(c, out))
                c = out
                if resolutions[level] in attn_resolutions:
                    mods.append(AttnBlock(c, key=next(keys)))
                skips.append(c)
            if level != num_levels - 1:
                mods.append(block(c, c, down=True))
                if progressive_input == "residual":
                    pyramid.append(PyramidDownsample(pyramid_c, c, fir=self.fir, key=next(keys)))
                    pyramid_c = c
                skips.append(c)
            down.append(tuple(mods))
        self.down = tuple(down)
        self.pyramid = tuple(pyramid)
        self.mid = (block(c, c), AttnBlock(c, key=next(keys)), block(c, c))
        up = []
        for level in reversed(range(num_levels)):
            mods = []
            for _ in range(num_res_blocks + 1):
                out = nf * ch_mult[level]
                mods.append(block(c + skips.pop(), out))
                c = out
            if resolutions[level] in attn_resolutions:
                mods.append(AttnBlock(c, key=next(keys)))
            if level != 0:
                mods.append(block(c, c, up=True))
            up.append(tuple(mods))
        assert not skips
        self.up = tuple(up)
        self.norm_out = GroupNorm32(c)
        self.conv_out = Conv2d(c, shape[-1], 3, init_scale=0.0, key=next(keys))

    def __check_init__(self):
        if not isinstance(self.sde, AbstractSDE):
            raise ValueError(f"sde must be a probflow SDE, got {type(self.sde).__name__}")

    @classmethod
    def ddpmpp(cls, shape=(32, 32, 3), *, sde, deep: bool = False, key, **kw: Any) -> DDPMpp:
        """DDPM++ cont. (deep): the paper's VP / sub-VP CIFAR-10 network."""
        kw = {"fir": False, "progressive_input": "none", "embedding": "positional", **kw}
        kw.setdefault("num_res_blocks", 8 if deep else 4)
        return cls(shape, sde=sde, key=key, **kw)

    @classmethod
    def ncsnpp(cls, shape=(32, 32, 3), *, sde, deep: bool = False, key, **kw: Any) -> DDPMpp:
        """NCSN++ cont. (deep): the paper's VE CIFAR-10 network."""
        kw = {"fir": True, "progressive_input": "residual", "embedding": "fourier", **kw}
        kw.setdefault("num_res_blocks", 8 if deep else 4)
        return cls(shape, sde=sde, key=key, **kw)

    @property
    def hyperparameters(self) -> dict:
        return dict(
            shape=list(self.shape),
            nf=self.nf,
            ch_mult=list(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=list(self.attn_resolutions),
            dropout=self.dropout,
            fir=self.fir,
            progressive_input=self.progressive_input,
            embedding=self.embedding,
            fourier_scale=self.fourier_scale,
            sigma_data=self.sigma_data,
        )

    def network(self, c_noise: Array, x: Array, *, key: PRNGKeyArray | None) -> Array:
        n_keys = 2 * len(self.ch_mult) * (self.num_res_blocks + 2) + 4
        keys = iter([None] * n_keys if key is None else list(jax.random.split(key, n_keys)))
        if self.embed is not None:
            temb = self.embed(c_noise)
        else:
            temb = _timestep_embedding(100.0 * c_noise, self.nf)
        temb = self.embed_mlp[1](jax.nn.silu(self.embed_mlp[0](temb)))

        def apply(mod, h):
            if isinstance(mod, BigGANBlock):
                return mod(h, temb, key=next(keys))
            return mod(h)

        pyramid_in = x
        hs = [self.conv_in(x)]
        for level, mods in enumerate(self.down):
            h = hs[-1]
            for mod in mods:
                h = apply(mod, h)
                if isinstance(mod, BigGANBlock) and mod.down and self.pyramid:
                    pyramid_in = self.pyramid[level](pyramid_in)
                    pyramid_in = (pyramid_in + h) / math.sqrt(2.0)
                    h = pyramid_in
                is_last_in_block = isinstance(mod, AttnBlock) or (
                    isinstance(mod, BigGANBlock) and not self._followed_by_attn(mods, mod)
                )
                if is_last_in_block:
                    hs.append(h)
        h = hs[-1]
        h = self.mid[0](h, temb, key=next(keys))
        h = self.mid[1](h)
        h = self.mid[2](h, temb, key=next(keys))
        for mods in self.up:
            for mod in mods:
                if isinstance(mod, BigGANBlock) and not (mod.up or mod.down):
                    h = mod(jnp.concatenate([h, hs.pop()], axis=-1), temb, key=next(keys))
                else:
                    h = apply(mod, h)
        assert not hs
        return self.conv_out(jax.nn.silu(self.norm_out(h)))

    @staticmethod
    def _followed_by_attn(mods, mod) -> bool:
        i = next(j for j, m in enumerate(mods) if m is mod)
        return i + 1 < len(mods) and isinstance(mods[i + 1], AttnBlock)
