"""The paper's score networks (Song et al. 2021, appendix H), channels last: DDPM, DDPM++, NCSN++.

`NCSNpp` computes the function of score_sde's `models/ncsnpp.py` network for the same weights
and, with `arch="ddpm"`, of its `models/ddpm.py` (DDPM's U-Net: 32-group GroupNorm, no skip
rescaling, DDPM residual blocks). One U-Net of residual blocks over `len(ch_mult)` resolutions,
self-attention at `attn_resolutions`, and the options of the paper's configs:

- `resblock_type`: "biggan" (ResnetBlockBigGANpp: the block itself resamples) or "ddpm"
  (ResnetBlockDDPM(pp), with separate Downsample/Upsample layers);
- `fir`: FIR-filtered resampling with `fir_kernel` (StyleGAN2's upfirdn2d) instead of 2x2 mean
  pooling and nearest-neighbour upsampling;
- `progressive_input` ("none", "input_skip", "residual"): an input pyramid added to the features
  after each downsampling; `progressive` ("none", "output_skip", "residual"): an output pyramid;
- `embedding_type`: "positional" (DDPM's sinusoids of the conditioning value) or "fourier"
  (Gaussian Fourier features of its log);
- `scale_by_sigma`: the output divided by the conditioning value (VE's sigma), and `centered`:
  whether inputs are already in [-1, 1] (else x -> 2x - 1 first).

`models._score_sde.ScoreSDEModel` adds the paper's score conventions to an imported `NCSNpp`;
`DDPMpp` trains the same network with probflow's preconditioning (`AbstractScoreModel`): it is
conditioned on c_noise = log std(t) (the positional embedding embeds 100 c_noise; log std spans
about [-11.5, 4] for probflow's SDEs, so this covers DDPM's range of timestep indices) and its
input is scaled by c_in instead of being mapped to [-1, 1]. Zero-initialised layers (the paper's
init_scale = 0) are exactly zero here, so an untrained score is exactly 0.
"""

from __future__ import annotations

import abc
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
_ACTIVATIONS = {
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "lrelu": lambda x: jax.nn.leaky_relu(x, 0.2),
}
RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
EMBEDDINGS = ("positional", "fourier")
COMBINE = ("sum", "cat")


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")


def _rescale(a: Array, b: Array, skip_rescale: bool) -> Array:
    return (a + b) / math.sqrt(2.0) if skip_rescale else a + b


class GroupNorm32(eqx.Module):
    """GroupNorm of one image [H, W, C], eps 1e-6, with `groups` groups (default min(C // 4, 32),
    as NCSN++; DDPM uses 32)."""

    scale: Array
    offset: Array
    groups: int = eqx.field(static=True)

    def __init__(self, channels: int, groups: int | None = None):
        self.groups = max(1, min(channels // 4, 32)) if groups is None else int(groups)
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


def _conv(x: Array, conv: Conv2d, *, stride: int = 1, padding, lhs_dilation: int = 1,
          bias: bool = True) -> Array:
    """`conv`'s weights applied to one image with explicit padding (HWIO, channels last)."""
    y = jax.lax.conv_general_dilated(
        x[None],
        conv.weight.astype(x.dtype),
        window_strides=(stride, stride),
        padding=padding,
        lhs_dilation=(lhs_dilation, lhs_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )[0]
    return y + conv.bias if bias else y


def _fir_kernel_2d(kernel, gain: float) -> np.ndarray:
    """_setup_kernel of up_or_down_sampling.py: outer product, normalised to sum 1, times gain."""
    k = np.asarray(kernel, np.float64)
    if k.ndim == 1:
        k = np.outer(k, k)
    return (k / k.sum() * gain).astype(np.float32)


def upfirdn2d(x: Array, k: np.ndarray, *, up: int = 1, down: int = 1, pad=(0, 0)) -> Array:
    """StyleGAN2's upfirdn2d of one image [H, W, C], per channel: insert up - 1 zeros after each
    pixel, pad by `pad` (both axes), convolve with `k`, keep every `down`-th pixel."""
    c = x.shape[-1]
    kf = np.ascontiguousarray(k[::-1, ::-1])  # a convolution, as a correlation
    w = jnp.asarray(np.tile(kf[:, :, None, None], (1, 1, 1, c)), x.dtype)  # HWIO, I = 1
    p0, p1 = pad
    return jax.lax.conv_general_dilated(
        x[None],
        w,
        window_strides=(down, down),
        # lhs_dilation puts no zeros after the last pixel: add them to the trailing pad
        padding=((p0, p1 + up - 1), (p0, p1 + up - 1)),
        lhs_dilation=(up, up),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )[0]


def fir_upsample(x: Array, kernel=_FIR_KERNEL) -> Array:
    """upsample_2d: upfirdn2d(x, k * 4, up=2, pad=((p + 1) // 2 + 1, p // 2)), p = len(k) - 2."""
    p = len(kernel) - 2
    return upfirdn2d(x, _fir_kernel_2d(kernel, 4.0), up=2, pad=((p + 1) // 2 + 1, p // 2))


def fir_downsample(x: Array, kernel=_FIR_KERNEL) -> Array:
    """downsample_2d: upfirdn2d(x, k, down=2, pad=((p + 1) // 2, p // 2)), p = len(k) - 2."""
    p = len(kernel) - 2
    return upfirdn2d(x, _fir_kernel_2d(kernel, 1.0), down=2, pad=((p + 1) // 2, p // 2))


def naive_downsample(x: Array) -> Array:
    h, w, c = x.shape
    return x.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def naive_upsample(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)


def resample_without_conv(x: Array, *, up: bool, fir: bool, kernel=_FIR_KERNEL) -> Array:
    """Up- or downsample by 2 without a conv: FIR-filtered, or nearest-neighbour / mean pooling."""
    if up:
        return fir_upsample(x, kernel) if fir else naive_upsample(x)
    return fir_downsample(x, kernel) if fir else naive_downsample(x)


def timestep_embedding(c: Array, dim: int) -> Array:
    """DDPM's sinusoidal embedding of a scalar (sin half, cos half; zero-padded to odd `dim`).
    The frequencies are float32 whatever the dtype of `c`, as in the paper's code."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    arg = c * freqs.astype(jnp.result_type(c, jnp.float32))
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])
    return jnp.pad(emb, (0, dim % 2))


def fourier_embedding(features: GaussianFourierFeatures, c: Array) -> Array:
    """GaussianFourierProjection: [sin, cos] of c W 2 pi, multiplied in the paper's order (at
    arguments of order 1e3, float32 rounding of another order changes the embedding by 1e-4)."""
    w = jax.lax.stop_gradient(features.frequencies).astype(jnp.result_type(c, jnp.float32))
    arg = c * w * 2 * math.pi
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


class BigGANBlock(eqx.Module):
    """ResnetBlockBigGANpp: GN-act-(resample)-conv, + Dense(act(temb)), GN-act-dropout-conv, a
    1x1 conv skip when the channels change or the block resamples; (x + h) / sqrt 2."""

    norm1: GroupNorm32
    conv1: Conv2d
    emb: Dense
    norm2: GroupNorm32
    conv2: Conv2d
    skip: Conv2d | None
    up: bool = eqx.field(static=True)
    down: bool = eqx.field(static=True)
    fir: bool = eqx.field(static=True)
    fir_kernel: tuple[float, ...] = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    skip_rescale: bool = eqx.field(static=True)
    act: str = eqx.field(static=True)

    def __init__(self, c_in, c_out, emb_dim, *, up=False, down=False, fir, dropout,
                 fir_kernel=_FIR_KERNEL, skip_rescale=True, act="swish", key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm32(c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, key=k1)
        self.emb = Dense(emb_dim, c_out, key=k2)
        self.norm2 = GroupNorm32(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, init_scale=0.0, key=k3)
        needs_skip = c_in != c_out or up or down
        self.skip = Conv2d(c_in, c_out, 1, key=k4) if needs_skip else None
        self.up, self.down, self.fir, self.dropout = bool(up), bool(down), bool(fir), dropout
        self.fir_kernel = tuple(float(v) for v in fir_kernel)
        self.skip_rescale, self.act = bool(skip_rescale), act

    def _resample(self, x):
        if self.up or self.down:
            return resample_without_conv(x, up=self.up, fir=self.fir, kernel=self.fir_kernel)
        return x

    def __call__(self, x, temb, *, key):
        act = _ACTIVATIONS[self.act]
        h = act(self.norm1(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv1(h) + self.emb(act(temb))
        h = act(self.norm2(h))
        h = _dropout(h, self.dropout, key)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return _rescale(x, h, self.skip_rescale)


class ResnetBlock(eqx.Module):
    """ResnetBlockDDPM(pp): GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv, a NIN
    shortcut when the channels change; x + h, or (x + h) / sqrt 2 with `skip_rescale`."""

    norm1: GroupNorm32
    conv1: Conv2d
    emb: Dense
    norm2: GroupNorm32
    conv2: Conv2d
    shortcut: Dense | None
    dropout: float = eqx.field(static=True)
    skip_rescale: bool = eqx.field(static=True)
    act: str = eqx.field(static=True)

    def __init__(self, c_in, c_out, emb_dim, *, dropout, skip_rescale, groups=None, act="swish",
                 key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm32(c_in, groups)
        self.conv1 = Conv2d(c_in, c_out, 3, key=k1)
        self.emb = Dense(emb_dim, c_out, key=k2)
        self.norm2 = GroupNorm32(c_out, groups)
        self.conv2 = Conv2d(c_out, c_out, 3, init_scale=0.0, key=k3)
        self.shortcut = Dense(c_in, c_out, key=k4) if c_in != c_out else None
        self.dropout, self.skip_rescale, self.act = dropout, bool(skip_rescale), act

    def __call__(self, x, temb, *, key):
        act = _ACTIVATIONS[self.act]
        h = self.conv1(act(self.norm1(x))) + self.emb(act(temb))
        h = act(self.norm2(h))
        h = _dropout(h, self.dropout, key)
        h = self.conv2(h)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return _rescale(x, h, self.skip_rescale)


def _dropout(h, rate, key):
    if rate > 0 and key is not None:
        keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
        return jnp.where(keep, h / (1.0 - rate), 0.0)
    return h


class AttnBlock(eqx.Module):
    """AttnBlock(pp): single-head self-attention over pixels, NIN q/k/v/out; x + h, or
    (x + h) / sqrt 2 with `skip_rescale`."""

    norm: GroupNorm32
    q: Dense
    k: Dense
    v: Dense
    out: Dense
    skip_rescale: bool = eqx.field(static=True)

    def __init__(self, channels, *, skip_rescale=True, groups=None, key):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.norm = GroupNorm32(channels, groups)
        self.q = Dense(channels, channels, key=kq)
        self.k = Dense(channels, channels, key=kk)
        self.v = Dense(channels, channels, key=kv)
        self.out = Dense(channels, channels, key=ko, init_scale=0.0)
        self.skip_rescale = bool(skip_rescale)

    def __call__(self, x):
        hh, ww, c = x.shape
        h = self.norm(x).reshape(hh * ww, c)
        q, k, v = self.q(h), self.k(h), self.v(h)
        attn = jax.nn.softmax(q @ k.T * (c**-0.5), axis=-1)
        out = self.out(attn @ v).reshape(hh, ww, c)
        return _rescale(x, out, self.skip_rescale)


class AbstractResample(eqx.Module):
    """Resampling by 2, with an optional 3x3 conv and optional FIR filtering (the fields and
    constructor shared by `Downsample` and `Upsample`)."""

    conv: Conv2d | None
    fir: bool = eqx.field(static=True)
    fir_kernel: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, c_in, c_out=None, *, with_conv, fir, fir_kernel=_FIR_KERNEL, key):
        c_out = c_in if c_out is None else c_out
        self.conv = Conv2d(c_in, c_out, 3, key=key) if with_conv else None
        self.fir, self.fir_kernel = bool(fir), tuple(float(v) for v in fir_kernel)

    @abc.abstractmethod
    def __call__(self, x): ...


class Downsample(AbstractResample):
    """Downsample by 2: FIR-filtered (then a valid strided 3x3 conv: conv_downsample_2d) or, without
    FIR, 2x2 mean pooling (or a stride-2 3x3 conv with 'SAME' padding (0, 1))."""

    __init__ = AbstractResample.__init__  # stated for type checkers (eqx inherits it anyway)

    def __call__(self, x):
        if self.conv is None:
            return resample_without_conv(x, up=False, fir=self.fir, kernel=self.fir_kernel)
        if not self.fir:
            return _conv(x, self.conv, stride=2, padding=((0, 1), (0, 1)))
        kw = self.conv.weight.shape[0]
        p = len(self.fir_kernel) - 2 + kw - 1
        x = upfirdn2d(x, _fir_kernel_2d(self.fir_kernel, 1.0), pad=((p + 1) // 2, p // 2))
        return _conv(x, self.conv, stride=2, padding="VALID")


class Upsample(AbstractResample):
    """Upsample by 2: FIR-filtered (a transposed 3x3 conv then the filter: upsample_conv_2d) or,
    without FIR, nearest-neighbour (then a 3x3 conv)."""

    __init__ = AbstractResample.__init__  # stated for type checkers (eqx inherits it anyway)

    def __call__(self, x):
        if self.conv is None:
            return resample_without_conv(x, up=True, fir=self.fir, kernel=self.fir_kernel)
        if not self.fir:
            return self.conv(naive_upsample(x))
        # conv_transpose2d (stride 2) with the flipped, transposed kernel is a correlation of the
        # zero-dilated input, padded by kw - 1, with the kernel itself.
        kw = self.conv.weight.shape[0]
        x = _conv(x, self.conv, padding=((kw - 1, kw - 1), (kw - 1, kw - 1)), lhs_dilation=2,
                  bias=False)
        p = len(self.fir_kernel) - 2 - (kw - 1)
        k = _fir_kernel_2d(self.fir_kernel, 4.0)
        return upfirdn2d(x, k, pad=((p + 1) // 2 + 1, p // 2 + 1)) + self.conv.bias


class Combine(eqx.Module):
    """Combine (input_skip): a 1x1 conv of the pyramid, summed with or concatenated before h."""

    conv: Conv2d
    method: str = eqx.field(static=True)

    def __init__(self, c_in, c_out, *, method, key):
        self.conv = Conv2d(c_in, c_out, 1, key=key)
        self.method = method

    def __call__(self, pyramid, h):
        p = self.conv(pyramid)
        return p + h if self.method == "sum" else jnp.concatenate([p, h], axis=-1)


class DownLevel(eqx.Module):
    """One resolution of the encoder: blocks (each followed by attention when `attns`), then the
    downsampling block and the input pyramid's step."""

    blocks: tuple[eqx.Module, ...]
    attns: tuple[AttnBlock, ...]
    down: eqx.Module | None  # BigGANBlock(down=True) or Downsample
    pyramid: Downsample | None
    combine: Combine | None


class UpLevel(eqx.Module):
    """One resolution of the decoder: blocks, attention, the output pyramid's step, upsampling."""

    blocks: tuple[eqx.Module, ...]
    attn: AttnBlock | None
    pyramid_norm: GroupNorm32 | None
    pyramid_conv: Conv2d | None
    pyramid_up: Upsample | None
    up: eqx.Module | None  # BigGANBlock(up=True) or Upsample


class NCSNpp(eqx.Module):
    """The paper's network (see the module docstring) on one image [H, W, C]: `net(x, cond)`, with
    `cond` the conditioning value that the paper's code passes (999 t for VP and sub-VP, sigma(t)
    for VE)."""

    arch: str = eqx.field(static=True)
    shape: tuple[int, int, int] = eqx.field(static=True)
    nf: int = eqx.field(static=True)
    ch_mult: tuple[int, ...] = eqx.field(static=True)
    num_res_blocks: int = eqx.field(static=True)
    attn_resolutions: tuple[int, ...] = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    resamp_with_conv: bool = eqx.field(static=True)
    fir: bool = eqx.field(static=True)
    fir_kernel: tuple[float, ...] = eqx.field(static=True)
    skip_rescale: bool = eqx.field(static=True)
    resblock_type: str = eqx.field(static=True)
    progressive: str = eqx.field(static=True)
    progressive_input: str = eqx.field(static=True)
    progressive_combine: str = eqx.field(static=True)
    embedding_type: str = eqx.field(static=True)
    fourier_scale: float = eqx.field(static=True)
    nonlinearity: str = eqx.field(static=True)
    centered: bool = eqx.field(static=True)
    scale_by_sigma: bool = eqx.field(static=True)
    embed: GaussianFourierFeatures | None
    temb: tuple[Dense, Dense]
    conv_in: Conv2d
    down: tuple[DownLevel, ...]
    mid: tuple[eqx.Module, AttnBlock, eqx.Module]
    up: tuple[UpLevel, ...]
    norm_out: GroupNorm32 | None
    conv_out: Conv2d | None

    def __init__(
        self,
        shape=(32, 32, 3),
        *,
        arch: str = "ncsnpp",
        nf: int = 128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions=(16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        fir: bool = False,
        fir_kernel=_FIR_KERNEL,
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "none",
        progressive_combine: str = "sum",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        nonlinearity: str = "swish",
        centered: bool = True,
        scale_by_sigma: bool = False,
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
        _choice("arch", arch, ("ncsnpp", "ddpm"))
        _choice("resblock_type", resblock_type, RESBLOCK_TYPES)
        _choice("progressive", progressive, PROGRESSIVE)
        _choice("progressive_input", progressive_input, PROGRESSIVE_INPUT)
        _choice("progressive_combine", progressive_combine, COMBINE)
        _choice("embedding_type", embedding_type, EMBEDDINGS)
        _choice("nonlinearity", nonlinearity, tuple(_ACTIVATIONS))
        if scale_by_sigma and embedding_type != "fourier":
            raise ValueError(
                "scale_by_sigma needs embedding_type 'fourier' (the positional embedding would "
                "divide by a table of discrete sigmas, which no continuous config uses)"
            )
        if arch == "ddpm" and (resblock_type, skip_rescale, fir, progressive, progressive_input,
                               embedding_type) != ("ddpm", False, False, "none", "none",
                                                   "positional"):
            raise ValueError(
                "arch 'ddpm' is DDPM's U-Net: resblock_type 'ddpm', skip_rescale False, fir False, "
                "progressive and progressive_input 'none', embedding_type 'positional'"
            )
        self.arch, self.shape, self.nf, self.ch_mult = arch, shape, nf, ch_mult
        self.num_res_blocks, self.attn_resolutions = num_res_blocks, attn_resolutions
        self.dropout, self.resamp_with_conv = float(dropout), bool(resamp_with_conv)
        self.fir, self.fir_kernel = bool(fir), tuple(float(v) for v in fir_kernel)
        self.skip_rescale, self.resblock_type = bool(skip_rescale), resblock_type
        self.progressive, self.progressive_input = progressive, progressive_input
        self.progressive_combine, self.embedding_type = progressive_combine, embedding_type
        self.fourier_scale, self.nonlinearity = float(fourier_scale), nonlinearity
        self.centered, self.scale_by_sigma = bool(centered), bool(scale_by_sigma)

        groups = 32 if arch == "ddpm" else None
        keys = iter(jax.random.split(key, 8 * len(ch_mult) * (num_res_blocks + 3) + 16))
        if embedding_type == "fourier":
            self.embed = GaussianFourierFeatures(2 * nf, self.fourier_scale, key=next(keys))
            embed_dim = 2 * nf
        else:
            self.embed = None
            embed_dim = nf
        emb_dim = 4 * nf
        self.temb = (Dense(embed_dim, emb_dim, key=next(keys)),
                     Dense(emb_dim, emb_dim, key=next(keys)))
        fir_kw = dict(fir=self.fir, fir_kernel=self.fir_kernel)

        def block(ci, co=None, **kw):
            co = ci if co is None else co
            if resblock_type == "biggan":
                return BigGANBlock(ci, co, emb_dim, dropout=self.dropout, act=nonlinearity,
                                   skip_rescale=self.skip_rescale, key=next(keys), **fir_kw, **kw)
            return ResnetBlock(ci, co, emb_dim, dropout=self.dropout, act=nonlinearity,
                               skip_rescale=self.skip_rescale, groups=groups, key=next(keys))

        def attn(c):
            return AttnBlock(c, skip_rescale=self.skip_rescale, groups=groups, key=next(keys))

        channels = shape[-1]
        num_levels = len(ch_mult)
        resolutions = [shape[0] // 2**i for i in range(num_levels)]
        self.conv_in = Conv2d(channels, nf, 3, key=next(keys))
        skips = [nf]
        c = nf
        pyramid_c = channels
        down = []
        for level in range(num_levels):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                out = nf * ch_mult[level]
                blocks.append(block(c, out))
                c = out
                if resolutions[level] in attn_resolutions:
                    attns.append(attn(c))
                skips.append(c)
            down_mod = pyramid = combine = None
            if level != num_levels - 1:
                if resblock_type == "biggan":
                    down_mod = block(c, down=True)
                else:
                    down_mod = Downsample(c, with_conv=self.resamp_with_conv, **fir_kw,
                                          key=next(keys))
                if progressive_input == "input_skip":
                    pyramid = Downsample(channels, with_conv=False, **fir_kw, key=next(keys))
                    combine = Combine(channels, c, method=progressive_combine, key=next(keys))
                    if progressive_combine == "cat":
                        c *= 2
                elif progressive_input == "residual":
                    pyramid = Downsample(pyramid_c, c, with_conv=True, **fir_kw, key=next(keys))
                    pyramid_c = c
                skips.append(c)
            down.append(DownLevel(tuple(blocks), tuple(attns), down_mod, pyramid, combine))
        self.down = tuple(down)
        self.mid = (block(c), attn(c), block(c))
        up = []
        pyramid_c = 0
        for level in reversed(range(num_levels)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                out = nf * ch_mult[level]
                blocks.append(block(c + skips.pop(), out))
                c = out
            up_attn = attn(c) if resolutions[level] in attn_resolutions else None
            p_norm = p_conv = p_up = None
            if progressive != "none":
                if level == num_levels - 1 or progressive == "output_skip":
                    if level != num_levels - 1:
                        p_up = Upsample(channels, with_conv=False, **fir_kw, key=next(keys))
                    p_norm = GroupNorm32(c, groups)
                    p_c = channels if progressive == "output_skip" else c
                    p_init = 0.0 if progressive == "output_skip" else 1.0
                    p_conv = Conv2d(c, p_c, 3, init_scale=p_init, key=next(keys))
                    pyramid_c = p_c
                else:  # residual, below the top
                    p_up = Upsample(pyramid_c, c, with_conv=True, **fir_kw, key=next(keys))
                    pyramid_c = c
            up_mod = None
            if level != 0:
                if resblock_type == "biggan":
                    up_mod = block(c, up=True)
                else:
                    up_mod = Upsample(c, with_conv=self.resamp_with_conv, **fir_kw, key=next(keys))
            up.append(UpLevel(tuple(blocks), up_attn, p_norm, p_conv, p_up, up_mod))
        assert not skips
        self.up = tuple(up)
        if progressive == "output_skip":
            self.norm_out = self.conv_out = None
        else:
            self.norm_out = GroupNorm32(c, groups)
            self.conv_out = Conv2d(c, channels, 3, init_scale=0.0, key=next(keys))

    def embedding(self, cond: Array) -> Array:
        """The embedding of the conditioning value, before the two dense layers: Fourier
        features of log(cond), or DDPM's sinusoids of cond."""
        if self.embed is not None:
            return fourier_embedding(self.embed, jnp.log(cond))
        return timestep_embedding(cond, self.nf)

    def __call__(self, x: Array, cond: Array, *, key: PRNGKeyArray | None = None) -> Array:
        h = self.trunk(x, self.embedding(cond), key=key)
        if self.scale_by_sigma:
            h = h / cond
        return h

    def trunk(self, x: Array, emb: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """The U-Net on one image given the embedding; `key` enables dropout (training)."""
        act = _ACTIVATIONS[self.nonlinearity]
        temb = self.temb[1](act(self.temb[0](emb)))
        if not self.centered:
            x = 2 * x - 1.0
        state = {"key": key}

        def run(block, h):
            k = state["key"]
            if k is not None:
                state["key"], k = jax.random.split(k)
            return block(h, temb, key=k)

        def resample(mod, h):
            return run(mod, h) if isinstance(mod, BigGANBlock) else mod(h)

        pyramid_in = x
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, blk in enumerate(level.blocks):
                h = run(blk, hs[-1])
                if level.attns:
                    h = level.attns[j](h)
                hs.append(h)
            if level.down is not None:
                h = resample(level.down, hs[-1])
                if level.combine is not None:  # input_skip
                    assert level.pyramid is not None
                    pyramid_in = level.pyramid(pyramid_in)
                    h = level.combine(pyramid_in, h)
                elif level.pyramid is not None:  # residual
                    pyramid_in = _rescale(level.pyramid(pyramid_in), h, self.skip_rescale)
                    h = pyramid_in
                hs.append(h)
        h = hs[-1]
        h = run(self.mid[0], h)
        h = self.mid[1](h)
        h = run(self.mid[2], h)
        pyramid = None
        for level in self.up:
            for blk in level.blocks:
                h = run(blk, jnp.concatenate([h, hs.pop()], axis=-1))
            if level.attn is not None:
                h = level.attn(h)
            if level.pyramid_conv is not None:
                assert level.pyramid_norm is not None
                head = level.pyramid_conv(act(level.pyramid_norm(h)))
                pyramid = head if level.pyramid_up is None else level.pyramid_up(pyramid) + head
            elif level.pyramid_up is not None:  # residual, below the top
                pyramid = _rescale(level.pyramid_up(pyramid), h, self.skip_rescale)
                h = pyramid
            if level.up is not None:
                h = resample(level.up, h)
        assert not hs
        if self.conv_out is None:
            assert pyramid is not None
            return pyramid
        assert self.norm_out is not None
        return self.conv_out(act(self.norm_out(h)))


class DDPMpp(AbstractScoreModel):
    """DDPM++ / NCSN++ trained with probflow's preconditioning (see the module docstring); `x` one
    image [H, W, C], channels last.

    `DDPMpp.ddpmpp(shape, sde=..., key=...)` and `DDPMpp.ncsnpp(...)` give the paper's CIFAR-10
    models (`deep=True`: 8 residual blocks per level instead of 4).
    """

    sde: AbstractSDE
    shape: tuple[int, ...] = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    net: NCSNpp

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
        progressive: str = "none",
        embedding: str = "positional",
        fourier_scale: float = 16.0,
        sigma_data: float = 0.5,
        key: PRNGKeyArray,
    ):
        _choice("progressive_input", progressive_input, PROGRESSIVE_INPUT)
        _choice("progressive", progressive, PROGRESSIVE)
        _choice("embedding", embedding, EMBEDDINGS)
        self.sde = sde
        self.shape = tuple(int(s) for s in shape)
        self.sigma_data = float(sigma_data)
        self.net = NCSNpp(
            shape, nf=nf, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, fir=fir,
            progressive_input=progressive_input, progressive=progressive,
            embedding_type=embedding, fourier_scale=fourier_scale, centered=True, key=key,
        )

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

    # The network's hyperparameters, read through.
    nf = property(lambda self: self.net.nf)
    ch_mult = property(lambda self: self.net.ch_mult)
    num_res_blocks = property(lambda self: self.net.num_res_blocks)
    attn_resolutions = property(lambda self: self.net.attn_resolutions)
    dropout = property(lambda self: self.net.dropout)
    fir = property(lambda self: self.net.fir)
    progressive_input = property(lambda self: self.net.progressive_input)
    progressive = property(lambda self: self.net.progressive)
    embedding = property(lambda self: self.net.embedding_type)
    fourier_scale = property(lambda self: self.net.fourier_scale)

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
            progressive=self.progressive,
            embedding=self.embedding,
            fourier_scale=self.fourier_scale,
            sigma_data=self.sigma_data,
        )

    def network(self, c_noise: Array, x: Array, *, key: PRNGKeyArray | None) -> Array:
        if self.net.embed is not None:
            emb = fourier_embedding(self.net.embed, c_noise)
        else:
            emb = timestep_embedding(100.0 * c_noise, self.net.nf)
        return self.net.trunk(x, emb, key=key)
