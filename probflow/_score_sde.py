"""Load the paper's released checkpoints: score_sde_pytorch's `.pth` files (torch.save of a dict
with 'model', 'ema', 'optimizer', 'step') and score_sde's flax checkpoint files (msgpack of its
training state, with 'params_ema'), into `ScoreSDEModel`s with the EMA weights.

Parameter names: the PyTorch code keeps its layers in one `all_modules` list (`module.` prefixed
under DataParallel) and its EMA as `shadow_params` in `model.parameters()` order (trainable ones
only: the Fourier features' frozen W stays in 'model'); flax names each submodule by class and
creation order (`ResnetBlockBigGANpp_3/Conv_0/kernel`). `_parameter_table` walks `NCSNpp` in the
reference's construction order and yields both names for every leaf, so one walk serves both
formats, the shape checks and the error messages.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._score_sde_configs import SCORE_SDE_CONFIGS
from ._sde import VESDE, VPSDE, AbstractSDE, SubVPSDE
from .models._ddpmpp import BigGANBlock, NCSNpp
from .models._score_sde import ScoreSDEModel

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_INSTALL = "pip install 'probflow[score-sde]'"


class ScoreSDEImportError(ValueError):
    """A paper checkpoint or config that cannot be loaded (one line saying why)."""


# ---------------------------------------------------------------------------------------------
# Configs


def _as_dict(obj, where: str) -> dict:
    if isinstance(obj, Mapping):
        return dict(obj)
    try:  # ml_collections.ConfigDict and the like
        return dict(obj)
    except (TypeError, ValueError):
        raise ScoreSDEImportError(
            f"config: {where} must be a mapping, got {type(obj).__name__}"
        ) from None


def _resolve_config(config) -> tuple[str, dict]:
    """(a label for messages, {'model': ..., 'data': ..., 'training': ...})."""
    if isinstance(config, str):
        if config not in SCORE_SDE_CONFIGS:
            raise ScoreSDEImportError(
                f"config: unknown config {config!r}; known: {', '.join(SCORE_SDE_CONFIGS)}"
            )
        return config, SCORE_SDE_CONFIGS[config]
    top = _as_dict(config, "config")
    out = {}
    for section in ("model", "data", "training"):
        if section not in top:
            raise ScoreSDEImportError(
                f"config: the mapping has no {section!r} section (it needs model, data and "
                f"training fields, as the paper's config files)"
            )
        out[section] = _as_dict(top[section], section)
    return "the given config", out


def _field(cfg: dict, section: str, name: str):
    try:
        return cfg[section][name]
    except KeyError:
        raise ScoreSDEImportError(f"config: {section}.{name} is missing") from None


def network_kwargs(config) -> dict:
    """The `NCSNpp` arguments (shape included) that a paper config describes."""
    label, cfg = _resolve_config(config)
    f = lambda s, n: _field(cfg, s, n)  # noqa: E731
    if f("training", "continuous") is not True:
        raise ScoreSDEImportError(
            f"config {label}: training.continuous is False; only continuous-time models "
            f"(get_score_fn with continuous=True) are supported"
        )
    name = f("model", "name")
    if name not in ("ncsnpp", "ddpm"):
        raise ScoreSDEImportError(f"config {label}: model.name must be 'ncsnpp' or 'ddpm', got "
                                  f"{name!r}")
    if f("model", "normalization") != "GroupNorm":
        raise ScoreSDEImportError(f"config {label}: only model.normalization 'GroupNorm' is "
                                  f"supported, got {f('model', 'normalization')!r}")
    if f("model", "conditional") is not True:
        raise ScoreSDEImportError(f"config {label}: only noise-conditional models "
                                  f"(model.conditional True) are supported")
    if cfg["model"].get("conv_size", 3) != 3:
        raise ScoreSDEImportError(f"config {label}: only model.conv_size 3 is supported")
    try:
        return _network_kwargs(f, name)
    except ScoreSDEImportError:
        raise
    except (TypeError, ValueError) as e:
        raise ScoreSDEImportError(
            f"config {label}: a model or data field has the wrong type ({e})"
        ) from None


def _network_kwargs(f, name: str) -> dict:
    size = int(f("data", "image_size"))
    kw: dict[str, Any] = dict(
        shape=(size, size, int(f("data", "num_channels"))),
        nf=int(f("model", "nf")),
        ch_mult=tuple(f("model", "ch_mult")),
        num_res_blocks=int(f("model", "num_res_blocks")),
        attn_resolutions=tuple(f("model", "attn_resolutions")),
        dropout=float(f("model", "dropout")),
        resamp_with_conv=bool(f("model", "resamp_with_conv")),
        nonlinearity=str(f("model", "nonlinearity")).lower(),
        centered=bool(f("data", "centered")),
        scale_by_sigma=bool(f("model", "scale_by_sigma")),
    )
    if name == "ddpm":
        kw.update(arch="ddpm", resblock_type="ddpm", skip_rescale=False, fir=False,
                  progressive="none", progressive_input="none", embedding_type="positional")
    else:
        kw.update(
            arch="ncsnpp",
            fir=bool(f("model", "fir")),
            fir_kernel=tuple(float(v) for v in f("model", "fir_kernel")),
            skip_rescale=bool(f("model", "skip_rescale")),
            resblock_type=str(f("model", "resblock_type")).lower(),
            progressive=str(f("model", "progressive")).lower(),
            progressive_input=str(f("model", "progressive_input")).lower(),
            progressive_combine=str(f("model", "progressive_combine")).lower(),
            embedding_type=str(f("model", "embedding_type")).lower(),
            fourier_scale=float(f("model", "fourier_scale")),
        )
    return kw


def sde_from_config(config) -> AbstractSDE:
    """The SDE of a paper config (training.sde with its model.beta_* / sigma_* fields)."""
    label, cfg = _resolve_config(config)
    sde = _field(cfg, "training", "sde")
    f = lambda n: float(_field(cfg, "model", n))  # noqa: E731
    if sde == "vpsde":
        return VPSDE(f("beta_min"), f("beta_max"))
    if sde == "subvpsde":
        return SubVPSDE(f("beta_min"), f("beta_max"))
    if sde == "vesde":
        return VESDE(f("sigma_min"), f("sigma_max"))
    raise ScoreSDEImportError(
        f"config {label}: training.sde must be 'vpsde', 'subvpsde' or 'vesde', got {sde!r}"
    )


def build_network(config, *, key) -> NCSNpp:
    """A freshly initialised network of a paper config (use `eqx.filter_eval_shape` on this for
    a free shape-only copy)."""
    kw = network_kwargs(config)
    try:
        return NCSNpp(kw.pop("shape"), **kw, key=key)
    except ValueError as e:
        raise ScoreSDEImportError(f"config: {e}") from None


# ---------------------------------------------------------------------------------------------
# Parameter names


@dataclasses.dataclass(frozen=True)
class _Param:
    path: str  # jax.tree_util.keystr of the leaf inside NCSNpp
    torch: str  # name in score_sde_pytorch's state_dict (no 'module.' prefix)
    flax: tuple[str, ...]  # path in score_sde's params tree
    to_ours: Callable[[np.ndarray], np.ndarray]  # torch layout -> ours (flax's is ours)
    to_torch_shape: Callable[[tuple], tuple]
    trainable: bool  # in the PyTorch EMA's shadow_params


_ID = (lambda a: a, lambda s: tuple(s))
_CONV = (lambda a: np.transpose(a, (2, 3, 1, 0)), lambda s: (s[3], s[2], s[0], s[1]))  # OIHW
_LINEAR = (lambda a: np.transpose(a), lambda s: (s[1], s[0]))  # nn.Linear's [out, in]

# layer kind -> (our attribute, torch name, flax name, layout)
_LAYERS = {
    "conv": [("weight", "weight", "kernel", _CONV), ("bias", "bias", "bias", _ID)],
    "firconv": [("weight", "weight", "weight", _CONV), ("bias", "bias", "bias", _ID)],
    "linear": [("weight", "weight", "kernel", _LINEAR), ("bias", "bias", "bias", _ID)],
    "nin": [("weight", "W", "W", _ID), ("bias", "b", "b", _ID)],
    "norm": [("scale", "weight", "scale", _ID), ("offset", "bias", "bias", _ID)],
    "fourier": [("frequencies", "W", "W", _ID)],
}


class _Walk:
    def __init__(self):
        self.params: list[_Param] = []
        self.torch_index = 0
        self.flax_counts: Counter[str] = Counter()

    def module(self, flax_cls: str, *, in_torch: bool = True) -> tuple[str, str]:
        """The next top-level module: its torch prefix and flax name."""
        flax_name = f"{flax_cls}_{self.flax_counts[flax_cls]}"
        self.flax_counts[flax_cls] += 1
        torch_name = f"all_modules.{self.torch_index}"
        if in_torch:
            self.torch_index += 1
        return torch_name, flax_name

    def layer(self, path: str, kind: str, torch_prefix: str, flax_prefix: tuple[str, ...]):
        for attr, torch_leaf, flax_leaf, (to_ours, to_torch_shape) in _LAYERS[kind]:
            self.params.append(_Param(
                path=f"{path}.{attr}", torch=f"{torch_prefix}.{torch_leaf}",
                flax=(*flax_prefix, flax_leaf), to_ours=to_ours, to_torch_shape=to_torch_shape,
                trainable=kind != "fourier",
            ))

    def top_layer(self, path: str, kind: str, flax_cls: str):
        tp, fl = self.module(flax_cls)
        self.layer(path, kind, tp, (fl,))

    def sublayers(self, path: str, flax_cls: str, parts, *, in_torch: bool = True):
        tp, fl = self.module(flax_cls, in_torch=in_torch)
        for attr, local, kind in parts:
            self.layer(f"{path}.{attr}", kind, f"{tp}.{local}", (fl, local))


def _parameter_table(net: NCSNpp) -> list[_Param]:
    """Every array leaf of `net` with its names in both reference formats, in the reference's
    `parameters()` order."""
    w = _Walk()
    ddpm = net.arch == "ddpm"
    biggan = net.resblock_type == "biggan"
    res_cls = "ResnetBlockBigGANpp" if biggan else ("ResnetBlockDDPM" if ddpm else
                                                   "ResnetBlockDDPMpp")
    attn_cls = "AttnBlock" if ddpm else "AttnBlockpp"

    def block(path, blk):
        parts = [("norm1", "GroupNorm_0", "norm"), ("conv1", "Conv_0", "conv"),
                 ("emb", "Dense_0", "linear"), ("norm2", "GroupNorm_1", "norm"),
                 ("conv2", "Conv_1", "conv")]
        if isinstance(blk, BigGANBlock):
            parts += [("skip", "Conv_2", "conv")] if blk.skip is not None else []
        elif blk.shortcut is not None:
            parts += [("shortcut", "NIN_0", "nin")]
        w.sublayers(path, res_cls, parts)

    def attn(path):
        w.sublayers(path, attn_cls, [("norm", "GroupNorm_0", "norm")] + [
            (a, f"NIN_{i}", "nin") for i, a in enumerate(("q", "k", "v", "out"))])

    def resample(path, mod, flax_cls, *, in_torch=True):
        if mod.conv is None:
            parts = []
        elif mod.fir:
            parts = [("conv", "Conv2d_0", "firconv")]
        else:
            parts = [("conv", "Conv_0", "conv")]
        w.sublayers(path, flax_cls, parts, in_torch=in_torch)

    if net.embed is not None:
        w.top_layer(".embed", "fourier", "GaussianFourierProjection")
    w.top_layer(".temb[0]", "linear", "Dense")
    w.top_layer(".temb[1]", "linear", "Dense")
    w.top_layer(".conv_in", "conv", "Conv")
    for i, level in enumerate(net.down):
        p = f".down[{i}]"
        for j, blk in enumerate(level.blocks):
            block(f"{p}.blocks[{j}]", blk)
            if level.attns:
                attn(f"{p}.attns[{j}]")
        if level.down is not None:
            if biggan:
                block(f"{p}.down", level.down)
            else:
                resample(f"{p}.down", level.down, "Downsample")
        if level.combine is not None:  # input_skip: the paramless pyramid Downsample isn't listed
            resample(f"{p}.pyramid", level.pyramid, "Downsample", in_torch=False)
            w.sublayers(f"{p}.combine", "Combine", [("conv", "Conv_0", "conv")])
        elif level.pyramid is not None:  # residual
            resample(f"{p}.pyramid", level.pyramid, "Downsample")
    block(".mid[0]", net.mid[0])
    attn(".mid[1]")
    block(".mid[2]", net.mid[2])
    for i, level in enumerate(net.up):
        p = f".up[{i}]"
        for j, blk in enumerate(level.blocks):
            block(f"{p}.blocks[{j}]", blk)
        if level.attn is not None:
            attn(f"{p}.attn")
        if level.pyramid_conv is not None:
            if level.pyramid_up is not None:  # output_skip's paramless upsampling
                resample(f"{p}.pyramid_up", level.pyramid_up, "Upsample", in_torch=False)
            w.top_layer(f"{p}.pyramid_norm", "norm", "GroupNorm")
            w.top_layer(f"{p}.pyramid_conv", "conv", "Conv")
        elif level.pyramid_up is not None:  # residual
            resample(f"{p}.pyramid_up", level.pyramid_up, "Upsample")
        if level.up is not None:
            if biggan:
                block(f"{p}.up", level.up)
            else:
                resample(f"{p}.up", level.up, "Upsample")
    if net.norm_out is not None:
        w.top_layer(".norm_out", "norm", "GroupNorm")
        w.top_layer(".conv_out", "conv", "Conv")
    return w.params


# ---------------------------------------------------------------------------------------------
# Files


def _sniff(path: Path) -> str:
    """"torch", "npz" (numpy's zip of .npy files, also a zip like torch's own format) or
    "flax" (anything else: msgpack has no magic bytes)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"  # torch.load says what is wrong with it
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    return "flax"


def _neither(path) -> ScoreSDEImportError:
    return ScoreSDEImportError(
        f"{path} is neither a score_sde_pytorch checkpoint (torch.save) nor a score_sde flax "
        f"checkpoint (msgpack)"
    )


def _npz_given(path) -> ScoreSDEImportError:
    return ScoreSDEImportError(
        f"{path} is a numpy .npz archive, not a model checkpoint: give a probflow checkpoint "
        f"(.eqx), a run directory or a shipped model's name, or with a config a checkpoint of "
        f"the paper's code (.pth or flax)"
    )


def _read_torch(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise ScoreSDEImportError(
            f"{path} is a PyTorch checkpoint; reading it needs torch ({_INSTALL})"
        ) from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScoreSDEImportError(f"{path}: cannot read the PyTorch checkpoint: {msg}") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ScoreSDEImportError(
            f"{path} is a torch file but not a score_sde_pytorch checkpoint (a dict with "
            f"'model', 'ema', 'optimizer', 'step')"
        )
    return dict(ckpt)


# Bounds on a flax file's tree, checked while reading it (msgpack itself stops at 1024 levels of
# nesting): the paper's trees are 5 levels deep with at most a few hundred entries per map.
MAX_FLAX_DEPTH = 64
MAX_FLAX_ENTRIES = 100_000


def _unchunk(tree, path, where=()):
    """flax's msgpack_restore: arrays over 1 GiB are stored as {'__msgpack_chunked_array__',
    'shape', 'chunks'} with tuples as {'0': ..., '1': ...}. Also checks the tree: string keys,
    at most `MAX_FLAX_DEPTH` levels (walked without recursion)."""
    out: dict = {}
    stack = [(tree, out, where)]
    while stack:
        node, into, at = stack.pop()
        if len(at) > MAX_FLAX_DEPTH:
            raise ScoreSDEImportError(
                f"{path}: the flax checkpoint's tree nests {len(at)} levels deep, more than the "
                f"{MAX_FLAX_DEPTH} allowed (at {'/'.join(at[:4])}/...): not a score_sde "
                f"checkpoint"
            )
        for k, v in node.items():
            if not isinstance(k, str):
                raise ScoreSDEImportError(
                    f"{path}: the flax checkpoint's key {k!r} (under {'/'.join(at) or 'the top'}) "
                    f"is not a string: not a score_sde checkpoint"
                )
            if isinstance(v, dict) and v.get("__msgpack_chunked_array__"):
                into[k] = _chunked_array(v, path, (*at, k))
            elif isinstance(v, dict):
                into[k] = {}
                stack.append((v, into[k], (*at, k)))
            else:
                into[k] = v
    return out


def _chunked_array(node: dict, path, at: tuple) -> np.ndarray:
    name = "/".join(at)
    shape, chunks = node.get("shape"), node.get("chunks")
    ok = (isinstance(shape, dict) and isinstance(chunks, dict)
          and set(shape) == {str(i) for i in range(len(shape))}
          and set(chunks) == {str(i) for i in range(len(chunks))})
    parts: list = []
    dims: list = []
    if ok and isinstance(shape, dict) and isinstance(chunks, dict):
        dims = [shape[str(i)] for i in range(len(shape))]
        parts = [chunks[str(i)] for i in range(len(chunks))]
        ok = (all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
              and all(isinstance(c, np.ndarray) and c.ndim == 1 for c in parts) and parts
              and len({c.dtype for c in parts}) == 1
              and sum(c.size for c in parts) == math.prod(dims))
    if not ok:
        raise ScoreSDEImportError(
            f"{path}: {name} is a malformed chunked array (flax's 'shape' and 'chunks' maps, "
            f"chunks of one dtype adding up to the shape)"
        )
    return np.concatenate(parts).reshape(dims)


def _ext_hook(code, data):
    import msgpack

    if code in (1, 3):  # flax's ndarray and numpy scalar: packb((shape, dtype name, bytes))
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        arr = np.frombuffer(buffer, dtype=np.dtype(dtype.decode())).reshape(shape)
        return arr if code == 1 else arr[()]
    if code == 2:
        re, im = msgpack.unpackb(data)
        return complex(re, im)
    return msgpack.ExtType(code, data)


def _read_flax(path: Path) -> dict:
    try:
        import msgpack
    except ImportError:
        raise ScoreSDEImportError(
            f"reading {path} as a flax checkpoint needs msgpack ({_INSTALL})"
        ) from None
    data = Path(path).read_bytes()
    try:
        state = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False,
                                max_map_len=MAX_FLAX_ENTRIES, max_array_len=MAX_FLAX_ENTRIES)
    except Exception:  # msgpack raises ExtraData, FormatError, ValueError, ...
        raise _neither(path) from None
    if not isinstance(state, dict) or not ({"params_ema", "optimizer"} & set(state)):
        raise _neither(path)
    return _unchunk(state, path)  # pyright: ignore[reportReturnType]  (a dict, checked above)


def _unwrap_params(tree):
    if isinstance(tree, dict) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def _flax_lookup(tree, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _flax_leaves(tree):
    """The paths of the leaves of a (checked, bounded) flax tree."""
    stack: list[tuple[tuple, Any]] = [((), tree)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            stack.extend(((*prefix, k), v) for k, v in reversed(node.items()))
        else:
            yield prefix


def _to_numpy(value) -> np.ndarray:
    if not isinstance(value, np.ndarray):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def _torch_arrays(ckpt: dict, table: list[_Param], expected: dict, *, ema: bool, label: str,
                  path) -> list:
    import torch

    for k, v in ckpt["model"].items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ScoreSDEImportError(
                f"{path}: the checkpoint's 'model' must map parameter names to tensors, got "
                f"{type(k).__name__} {str(k)[:40]!r} -> {type(v).__name__}: not a "
                f"score_sde_pytorch checkpoint"
            )
    model = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    for p in table:
        if p.torch not in model:
            raise ScoreSDEImportError(
                f"{path}: the checkpoint has no parameter {p.torch!r}, which config {label} "
                f"expects: the config does not fit the weights"
            )
        got, want = tuple(model[p.torch].shape), p.to_torch_shape(expected[p.path])
        if got != want:
            raise ScoreSDEImportError(
                f"{path}: parameter {p.torch} has shape {got} in the checkpoint but config "
                f"{label} expects {want}: the config does not fit the weights"
            )
    names = {p.torch for p in table}
    extra = [k for k in model if k not in names and k != "sigmas"]
    if extra:
        raise ScoreSDEImportError(
            f"{path}: the checkpoint has {len(extra)} parameters that config {label} does not "
            f"have (first: {extra[0]}): the config does not fit the weights"
        )
    values = {p.torch: model[p.torch] for p in table}
    if ema:
        shadow = (ckpt.get("ema") or {}).get("shadow_params") if isinstance(
            ckpt.get("ema"), Mapping) else None
        if not shadow:
            raise ScoreSDEImportError(
                f"{path} holds no EMA weights ('ema' with 'shadow_params'); pass ema=False to "
                f"use the raw weights"
            )
        if not isinstance(shadow, (list, tuple)) or not all(
                isinstance(s, torch.Tensor) for s in shadow):
            raise ScoreSDEImportError(
                f"{path}: the EMA's 'shadow_params' must be a list of tensors, got "
                f"{type(shadow).__name__}: not a score_sde_pytorch checkpoint"
            )
        trainable = [p for p in table if p.trainable]
        if len(shadow) != len(trainable):
            raise ScoreSDEImportError(
                f"{path}: the EMA holds {len(shadow)} parameters but config {label} has "
                f"{len(trainable)} trainable ones: the config does not fit the weights"
            )
        for p, s in zip(trainable, shadow):
            if tuple(s.shape) != tuple(values[p.torch].shape):
                raise ScoreSDEImportError(
                    f"{path}: the EMA copy of {p.torch} has shape {tuple(s.shape)}, the model's "
                    f"{tuple(values[p.torch].shape)}"
                )
            values[p.torch] = s
    return [p.to_ours(_to_numpy(values[p.torch])) for p in table]


def _flax_arrays(state: dict, table: list[_Param], expected: dict, *, ema: bool, label: str,
                 path) -> list:
    if ema:
        if "params_ema" not in state:
            raise ScoreSDEImportError(
                f"{path} holds no EMA weights ('params_ema'); pass ema=False to use the raw "
                f"weights"
            )
        params = state["params_ema"]
    else:
        params = _flax_lookup(state, ("optimizer", "target"))
        if params is None:
            raise ScoreSDEImportError(f"{path} holds no raw weights ('optimizer' / 'target')")
    params = _unwrap_params(params)
    if not isinstance(params, dict):
        raise ScoreSDEImportError(
            f"{path}: the weights ({'params_ema' if ema else 'optimizer/target'}) must be a tree "
            f"of named arrays, got {type(params).__name__}: not a score_sde checkpoint"
        )
    out = []
    for p in table:
        value = _flax_lookup(params, p.flax)
        name = "/".join(p.flax)
        if value is None:
            raise ScoreSDEImportError(
                f"{path}: the checkpoint has no parameter {name!r}, which config {label} "
                f"expects: the config does not fit the weights"
            )
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise ScoreSDEImportError(
                f"{path}: parameter {name} is not an array of numbers (got "
                f"{type(value).__name__}): not a score_sde checkpoint"
            )
        got, want = tuple(np.shape(value)), tuple(expected[p.path])
        if got != want:
            raise ScoreSDEImportError(
                f"{path}: parameter {name} has shape {got} in the checkpoint but config "
                f"{label} expects {want}: the config does not fit the weights"
            )
        out.append(_to_numpy(value))
    names = {p.flax for p in table}
    extra = [k for k in _flax_leaves(params) if k not in names]
    if extra:
        raise ScoreSDEImportError(
            f"{path}: the checkpoint has {len(extra)} parameters that config {label} does not "
            f"have (first: {'/'.join(extra[0])}): the config does not fit the weights"
        )
    return out


def load_score_sde(path: str | os.PathLike, config, *, ema: bool = True):
    """`(model, sde)` from a checkpoint of the paper's code, with its EMA weights.

    `path`: a score_sde_pytorch `.pth` (torch.save of {'model', 'ema', 'optimizer', 'step'}) or a
    score_sde flax checkpoint file (msgpack of its training state). `config`: the name of the
    paper's config file, its path under configs/ without ".py" (e.g.
    "subvp/cifar10_ddpmpp_deep_continuous"; `SCORE_SDE_CONFIGS` lists them), or a mapping of its
    model/data/training fields (`score_sde_config(name)` gives one to edit). `ema=False` takes
    the raw (non-averaged) weights instead. The model's `data_range` is (-1, 1) for configs that
    centre the data, else (0, 1); bits_per_dim takes `data_range=model.data_range` and 256 bins.

    **Arguments:**

    - `path`: a score_sde_pytorch `.pth` or a score_sde flax checkpoint file.
    - `config`: the paper's config name (e.g. "vp/cifar10_ddpmpp_continuous") or a mapping of its
      fields.
    - `ema`: the EMA weights (True, the paper's evaluation) or the raw ones.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreSDEImportError(f"{path}: no such file")
    label = config if isinstance(config, str) else "(mapping)"
    kw = network_kwargs(config)
    sde = sde_from_config(config)
    shape = kw.pop("shape")
    try:
        skeleton = eqx.filter_eval_shape(NCSNpp, shape, **kw, key=jax.random.key(0))
    except ValueError as e:
        raise ScoreSDEImportError(f"config {label}: {e}") from None
    table = _parameter_table(skeleton)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    order = {jax.tree_util.keystr(k): i for i, (k, _) in enumerate(leaves)}
    assert set(order) == {p.path for p in table}, "parameter table out of step with NCSNpp"
    expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}
    if _sniff(path) == "npz":
        raise _npz_given(path)
    if _sniff(path) == "torch":
        arrays = _torch_arrays(_read_torch(path), table, expected, ema=ema, label=label,
                               path=path)
    else:
        arrays = _flax_arrays(_read_flax(path), table, expected, ema=ema, label=label,
                              path=path)
    for p, a in zip(table, arrays):
        if not np.isfinite(a).all():
            name = p.torch if _sniff(path) == "torch" else "/".join(p.flax)
            raise ScoreSDEImportError(
                f"{path}: parameter {name} holds non-finite values (NaN or inf); the model "
                f"cannot be used"
            )
    values: list[Any] = [None] * len(leaves)
    for p, a in zip(table, arrays):
        values[order[p.path]] = jnp.asarray(a)
    net = jax.tree_util.tree_unflatten(treedef, values)
    return ScoreSDEModel(net, sde), sde


def load_score_model(checkpoint: str | os.PathLike, config=None, *, ema: bool = True):
    """`(model, sde, data_range, num_bins)` for a command line's `--checkpoint [--config]`.

    With `config` (a paper config name or mapping), `checkpoint` is a paper checkpoint
    (`load_score_sde`; 256 bins, the config's data range). Without, it is a probflow checkpoint
    file, a run directory holding checkpoint.eqx, or a shipped model's name ("digits-vp");
    `num_bins` is None when the checkpoint does not record it.
    """
    if config is not None:
        model, sde = load_score_sde(checkpoint, config, ema=ema)
        return model, sde, model.data_range, 256
    from ._checkpoint import CheckpointError, load_checkpoint
    from ._pretrained import PRETRAINED_NAMES, pretrained_path

    spec = str(checkpoint)
    if spec in PRETRAINED_NAMES:
        path = pretrained_path(spec)
    else:
        path = Path(checkpoint)
        if path.is_dir():
            path = path / "checkpoint.eqx"
            if not path.is_file():
                raise ScoreSDEImportError(
                    f"{spec!r} is a folder without a checkpoint.eqx (a run directory holds one "
                    f"once training has written its first checkpoint)"
                )
        if not path.is_file():
            raise ScoreSDEImportError(
                f"no such file {spec!r} (and not a shipped model: "
                f"{', '.join(PRETRAINED_NAMES)})"
            )
    try:
        model, sde, cfg = load_checkpoint(path)
    except CheckpointError:
        if _sniff(path) == "npz":
            raise _npz_given(path) from None
        if _sniff(path) == "torch" or _looks_like_msgpack(path):
            raise ScoreSDEImportError(
                f"{path} is a checkpoint of the paper's code; name its config (e.g. "
                f"vp/cifar10_ddpmpp_continuous; known: {', '.join(SCORE_SDE_CONFIGS)})"
            ) from None
        raise
    data_range = tuple(float(v) for v in (cfg.get("data_range") or (0.0, 1.0)))
    num_bins = cfg.get("num_bins")
    return model, sde, data_range, None if num_bins is None else int(num_bins)


def _looks_like_msgpack(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.read(1)
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))
