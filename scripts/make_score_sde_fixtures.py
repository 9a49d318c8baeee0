"""Record the paper's own networks as fixtures for tests/test_score_sde.py (`pf.load_score_sde`).

    PYTHONPATH=/path/to/flax-site python scripts/make_score_sde_fixtures.py \
        --reference /path/to/score_sde_pytorch --reference /path/to/score_sde

Each `--reference` is a checkout of the paper's code: yang-song/score_sde_pytorch (PyTorch) and
yang-song/score_sde (JAX/flax). None of their code goes into probflow: this script imports them,
in one subprocess each, and writes to tests/data/score_sde/:

- for each fixture (a small version of one of the paper's configs: few channels, 8x8 or 16x16
  images), the reference's network with random weights in every layer (those the paper
  initialises to zero too), saved as the reference saves it: score_sde_pytorch's
  `utils.save_checkpoint` (torch.save of model, ema, optimizer, step; `NAME.pth.xz`) and a flax
  checkpoint file (`flax.serialization.to_bytes` of the JAX code's training `State`, which is
  what flax's `checkpoints.save_checkpoint` writes; `NAME.msgpack.xz`). The weights lie on a
  coarse grid (q/8 times a per-layer power of two, q = +-1..8), so that xz compresses the files
  well; the raw weights are the EMA ones times 1 + s/8 (s = +-1, +-2) per layer;
- `NAME.npz`: fixed inputs x [B, H, W, C] in the config's data range, times t [B], and the
  scores of the reference's `get_score_fn(sde, model, train=False, continuous=True)` with the
  EMA weights and with the raw ones, for each format (channels last), and those of the JAX
  reference run in float64 (x64, the same weights cast) with the EMA weights;
- `manifest.json`: the fixtures (base config name, overrides, the reference's own resolved
  config fields), the parameter count of every full-size `*_continuous` config from each
  reference's own network, and the package versions used.

It also checks probflow's config table (`probflow._score_sde_configs`) against the reference's
config files, field by field.

What the references need here (CPU only, offline):
- score_sde_pytorch: torch and ml_collections. Its `op` package compiles CUDA kernels
  (upfirdn2d, fused_act) with `torch.utils.cpp_extension.load` when imported; the stand-in is a
  `load` that returns a placeholder (raising if a kernel is ever called), so `op` imports and
  its `upfirdn2d` takes its own pure-torch CPU path (`upfirdn2d_native`). Its `utils.py`
  imports tensorflow only for reading checkpoints: an empty module stands in when tensorflow
  is absent.
- score_sde: flax (tested with flax 0.12.8 on jax 0.10.1, installed without dependencies:
  `pip install --no-deps --target DIR flax==0.12.8 treescope`; PYTHONPATH=DIR) and
  ml_collections. Stand-ins: `flax.optim` (removed from flax; the `State` annotation and the
  layout of flax 0.3's Adam optimizer state: {'target', 'state': {'step', 'param_states'}}),
  `flax.training.checkpoints` when orbax is absent (unused), and tensorflow as above; and
  flax's `flax_return_frozendict` flag, so that `init` returns a FrozenDict as in 2021.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import lzma
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "score_sde"

# name, base config, model overrides, data overrides
FIXTURES = [
    ("vp_ddpm", "vp/ddpm/cifar10_continuous",
     dict(nf=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,)), dict(image_size=8)),
    ("vp_ddpmpp", "vp/cifar10_ddpmpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)), dict(image_size=8)),
    ("subvp_ddpmpp_deep", "subvp/cifar10_ddpmpp_deep_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)), dict(image_size=8)),
    ("subvp_ncsnpp", "subvp/cifar10_ncsnpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)), dict(image_size=8)),
    ("vp_ncsnpp_deep", "vp/cifar10_ncsnpp_deep_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)), dict(image_size=8)),
    ("ve_ncsnpp", "ve/cifar10_ncsnpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)), dict(image_size=8)),
    ("ve_ncsnpp_deep", "ve/cifar10_ncsnpp_deep_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)), dict(image_size=8)),
    ("ve_celebahq_256", "ve/celebahq_256_ncsnpp_continuous",
     dict(nf=4, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(4,)),
     dict(image_size=16)),
    ("ve_ffhq_1024", "ve/ffhq_ncsnpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,)),
     dict(image_size=16)),
    # Edited configs (passed as mappings): the options no released config uses.
    ("edited_output_skip", "vp/cifar10_ddpmpp_continuous",
     dict(nf=4, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resblock_type="ddpm",
          resamp_with_conv=False, progressive="output_skip", progressive_input="residual",
          nonlinearity="lrelu"),
     dict(image_size=8, centered=False)),
    ("edited_pyramid_nofir", "subvp/cifar10_ddpmpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
          progressive_input="residual", nonlinearity="relu"),
     dict(image_size=8)),
    ("edited_fir_noconv", "ve/celebahq_256_ncsnpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), resblock_type="ddpm",
          resamp_with_conv=False, progressive_combine="cat", skip_rescale=False,
          nonlinearity="elu"),
     dict(image_size=8)),
    ("edited_residual", "ve/cifar10_ncsnpp_continuous",
     dict(nf=4, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), resblock_type="ddpm",
          progressive="residual"),
     dict(image_size=8)),
]
# score_sde_pytorch cannot run these configs: its layerspp.Upsample without FIR calls
# F.interpolate(x, size, 'nearest'), passing 'nearest' as scale_factor, which raises; with FIR
# and a conv, its upsample_conv_2d slices a tensor with step -1, which torch refuses.
JAX_ONLY = {"edited_output_skip", "edited_residual"}
BATCH = 4
TIMES = {"vesde": [1e-5, 0.1, 0.5, 1.0], "vpsde": [0.05, 0.3, 0.7, 1.0],
         "subvpsde": [0.05, 0.3, 0.7, 1.0]}
MODEL_FIELDS = [
    "name", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
    "conditional", "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive",
    "progressive_input", "progressive_combine", "embedding_type", "fourier_scale", "init_scale",
    "conv_size", "scale_by_sigma", "nonlinearity", "normalization", "sigma_min", "sigma_max",
    "beta_min", "beta_max", "num_scales", "ema_rate",
]


def _plain(v):
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------- shared by workers


def _config_names(ref: str) -> list[str]:
    paths = glob.glob(os.path.join(ref, "configs", "**", "*_continuous.py"), recursive=True)
    return sorted(os.path.relpath(p, os.path.join(ref, "configs"))[:-3] for p in paths)


def _load_config(name: str):
    return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def _config_fields(config) -> dict:
    return {
        "model": {k: _plain(config.model[k]) for k in MODEL_FIELDS if k in config.model},
        "data": {k: _plain(config.data[k])
                 for k in ("dataset", "image_size", "num_channels", "centered")},
        "training": {k: _plain(config.training[k]) for k in ("sde", "continuous")},
    }


def _small_config(base: str, model_over: dict, data_over: dict):
    config = _load_config(base)
    for k, v in model_over.items():
        setattr(config.model, k, v)
    for k, v in data_over.items():
        setattr(config.data, k, v)
    return config


def _grid(rng, shape, scale):
    """Random values q / 8 * scale, q in +-{1..8}: non-zero, and few distinct ones."""
    q = rng.integers(1, 9, size=shape) * rng.choice([-1, 1], size=shape)
    return (q / 8.0 * scale).astype(np.float32)


def _random_weight(rng, shape, fan_avg):
    """Like the paper's default_init (uniform, fan_avg), at a power-of-two scale."""
    return _grid(rng, shape, 2.0 ** np.round(np.log2(np.sqrt(3.0 / fan_avg))))


def _raw_factor(rng):
    """The raw weights of a layer: its EMA weights times 1 + s/8, s in +-{1, 2}."""
    return np.float32(1.0 + rng.choice([-2, -1, 1, 2]) / 8.0)


def _empty_module(name: str) -> types.ModuleType:
    """A stand-in module (with a spec, which torch's import machinery asks for)."""
    import importlib.machinery
    import importlib.util

    return importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None))


def _inputs(config, seed: int):
    rng = np.random.default_rng(seed)
    size, ch = config.data.image_size, config.data.num_channels
    lo = -1.0 if config.data.centered else 0.0
    x = rng.uniform(lo, 1.0, size=(BATCH, size, size, ch)).astype(np.float32)
    t = np.asarray(TIMES[config.training.sde], np.float32)
    return x, t


# ------------------------------------------------------------------------- the PyTorch worker


def _torch_worker(ref: str, out: Path):
    import torch

    torch.set_num_threads(1)
    import torch.utils.cpp_extension as cpp

    class _NoCUDAKernel:
        def __getattr__(self, name):
            raise RuntimeError("the CUDA kernels of op/ are not available (CPU stand-in)")

    cpp.load = lambda *a, **k: _NoCUDAKernel()  # op/ compiles CUDA kernels at import
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        sys.modules["tensorflow"] = _empty_module("tensorflow")
    sys.path.insert(0, ref)
    import losses
    import sde_lib
    import utils as ref_utils
    from models import ddpm, ncsnpp  # noqa: F401  (register the models)
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage

    result = {"versions": {"torch": torch.__version__}, "configs": {}, "counts": {},
              "fixtures": {}}
    for name in _config_names(ref):
        config = _load_config(name)
        result["configs"][name] = _config_fields(config)
        config.device = torch.device("cpu")
        model = mutils.get_model(config.model.name)(config)
        result["counts"][name] = sum(p.numel() for p in model.parameters())
        del model

    for i, (fid, base, model_over, data_over) in enumerate(FIXTURES):
        if fid in JAX_ONLY:
            continue
        config = _small_config(base, model_over, data_over)
        config.device = torch.device("cpu")
        torch.manual_seed(i)
        score_model = mutils.create_model(config)  # DataParallel: 'module.' keys
        rng = np.random.default_rng(100 + i)
        with torch.no_grad():
            for pname, p in score_model.named_parameters():
                shape = tuple(p.shape)
                if pname.endswith(".W") and len(shape) == 1:  # Fourier features: keep N(0, 16^2)
                    continue
                if len(shape) == 4:  # OIHW
                    fan = (shape[0] + shape[1]) / 2 * shape[2] * shape[3]
                    w = _random_weight(rng, shape, fan)
                elif len(shape) == 2:
                    w = _random_weight(rng, shape, (shape[0] + shape[1]) / 2)
                elif "GroupNorm" in pname or _is_top_level_norm(score_model, pname):
                    w = (1.0 + _grid(rng, shape, 0.25)).astype(np.float32)
                else:  # biases
                    w = _grid(rng, shape, 0.125)
                p.copy_(torch.from_numpy(w))
        params = list(score_model.parameters())
        ema = ExponentialMovingAverage(params, decay=config.model.ema_rate)  # shadow = these
        with torch.no_grad():  # the raw weights: the EMA plus a step of "training"
            for p in params:
                if p.requires_grad:
                    p.mul_(float(_raw_factor(rng)))
        optimizer = losses.get_optimizer(config, score_model.parameters())
        state = dict(optimizer=optimizer, model=score_model, ema=ema, step=1000)
        tmp = out / f"{fid}.pth"
        ref_utils.save_checkpoint(str(tmp), state)

        sde = _torch_sde(sde_lib, config)
        x, t = _inputs(config, seed=i)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        tt = torch.from_numpy(t)
        score_fn = mutils.get_score_fn(sde, score_model, train=False, continuous=True)
        with torch.no_grad():
            raw = score_fn(xt, tt).numpy().transpose(0, 2, 3, 1)
            ema.store(score_model.parameters())
            ema.copy_to(score_model.parameters())
            avg = score_fn(xt, tt).numpy().transpose(0, 2, 3, 1)
            ema.restore(score_model.parameters())
        np.savez(out / f"{fid}.torch.npz", x=x, t=t, score_ema=avg, score_raw=raw)
        result["fixtures"][fid] = {"config": _config_fields(config),
                                   "parameters": sum(p.numel() for p in params)}
    (out / "torch.json").write_text(json.dumps(result))


def _is_top_level_norm(model, pname: str) -> bool:
    mod = model
    for part in pname.split(".")[:-1]:
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
    return type(mod).__name__ == "GroupNorm"


def _torch_sde(sde_lib, config):
    m = config.model
    if config.training.sde == "vpsde":
        return sde_lib.VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
    if config.training.sde == "subvpsde":
        return sde_lib.subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
    return sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)


# ------------------------------------------------------------------------- the JAX worker


def _jax_worker(ref: str, out: Path):
    import flax
    import flax.serialization
    import flax.struct
    import flax.traverse_util
    import jax

    try:
        import tensorflow  # noqa: F401
    except ImportError:
        sys.modules["tensorflow"] = _empty_module("tensorflow")
    try:
        import flax.training.checkpoints  # noqa: F401
    except ImportError:  # needs orbax, which the model code does not use
        stub = _empty_module("flax.training.checkpoints")
        sys.modules["flax.training.checkpoints"] = stub
        import flax.training

        flax.training.checkpoints = stub  # type: ignore[attr-defined]

    @flax.struct.dataclass
    class Optimizer:  # the state-dict layout of flax 0.3's flax.optim.Optimizer
        target: object
        state: object

    @flax.struct.dataclass
    class OptimizerState:
        step: object
        param_states: object

    @flax.struct.dataclass
    class AdamParamState:
        grad_ema: object
        grad_sq_ema: object

    flax.optim = types.SimpleNamespace(Optimizer=Optimizer)  # type: ignore[attr-defined]
    # init_model does `state, params = variables.pop('params')`: FrozenDict's pop, as in 2021
    flax.config.update("flax_return_frozendict", True)
    sys.path.insert(0, ref)
    import sde_lib
    from models import ddpm, ncsnpp  # noqa: F401
    from models import utils as mutils

    result = {"versions": {"jax": jax.__version__, "flax": flax.__version__}, "configs": {},
              "counts": {}, "fixtures": {}}
    for name in _config_names(ref):
        config = _load_config(name)
        result["configs"][name] = _config_fields(config)
        model = mutils.get_model(config.model.name)(config=config)
        size, ch = config.data.image_size, config.data.num_channels
        keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        x0, t0 = jax.numpy.zeros((1, size, size, ch)), jax.numpy.zeros((1,), jax.numpy.int32)
        shapes = jax.eval_shape(lambda k, x, t, m=model: m.init(k, x, t, train=False), keys, x0,
                                t0)
        result["counts"][name] = sum(int(np.prod(s.shape))
                                     for s in jax.tree.leaves(shapes["params"]))

    fixtures = {}
    for i, (fid, base, model_over, data_over) in enumerate(FIXTURES):
        config = _small_config(base, model_over, data_over)
        model, init_state, params = mutils.init_model(jax.random.PRNGKey(i), config)
        rng = np.random.default_rng(200 + i)
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        new = {}
        for path, p in flat.items():
            shape = tuple(p.shape)
            if path[-1] == "W" and len(shape) == 1:  # Fourier features
                new[path] = np.asarray(p)
            elif len(shape) == 4:  # HWIO
                new[path] = _random_weight(rng, shape, (shape[2] + shape[3]) / 2 * shape[0]
                                           * shape[1])
            elif len(shape) == 2:
                new[path] = _random_weight(rng, shape, (shape[0] + shape[1]) / 2)
            elif path[-1] == "scale":
                new[path] = (1.0 + _grid(rng, shape, 0.25)).astype(np.float32)
            else:
                new[path] = _grid(rng, shape, 0.125)
        params_ema = flax.traverse_util.unflatten_dict(new)
        raw = flax.traverse_util.unflatten_dict({
            k: v if (k[-1] == "W" and v.ndim == 1)
            else (v * _raw_factor(rng)).astype(np.float32)
            for k, v in new.items()})
        zeros = jax.tree.map(np.zeros_like, raw)
        param_states = jax.tree.map(lambda z: AdamParamState(z, z), zeros)
        optimizer = Optimizer(target=raw, state=OptimizerState(step=np.int32(1000),
                                                               param_states=param_states))
        state = mutils.State(step=1000, optimizer=optimizer, lr=config.optim.lr,
                             model_state=init_state, ema_rate=config.model.ema_rate,
                             params_ema=params_ema, rng=jax.random.PRNGKey(i))
        (out / f"{fid}.msgpack").write_bytes(flax.serialization.to_bytes(state))

        sde = _jax_sde(sde_lib, config)
        x, t = _inputs(config, seed=i)
        scores = {}
        for label, p in (("ema", params_ema), ("raw", raw)):
            score_fn = mutils.get_score_fn(sde, model, p, init_state, train=False,
                                           continuous=True)
            scores[label] = np.asarray(score_fn(jax.numpy.asarray(x), jax.numpy.asarray(t)))
        np.savez(out / f"{fid}.flax.npz", x=x, t=t, score_ema=scores["ema"],
                 score_raw=scores["raw"])
        result["fixtures"][fid] = {"config": _config_fields(config),
                                   "parameters": sum(int(v.size) for v in new.values())}
        fixtures[fid] = (model, init_state, params_ema, sde, x, t)
    # The same networks in float64 (x64 on, the weights cast): the reference's function without
    # float32 rounding, except its float32 positional-embedding frequencies (np.float32 in its
    # code, as in probflow).
    jax.config.update("jax_enable_x64", True)
    for fid, (model, init_state, params_ema, sde, x, t) in fixtures.items():
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params_ema)
        score_fn = mutils.get_score_fn(sde, model, p64, init_state, train=False,
                                       continuous=True)
        s64 = np.asarray(score_fn(jax.numpy.asarray(x, np.float64),
                                  jax.numpy.asarray(t, np.float64)))
        assert s64.dtype == np.float64
        np.save(out / f"{fid}.flax64.npy", s64)
    (out / "jax.json").write_text(json.dumps(result))


def _jax_sde(sde_lib, config):
    m = config.model
    if config.training.sde == "vpsde":
        return sde_lib.VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
    if config.training.sde == "subvpsde":
        return sde_lib.subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
    return sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)


# ------------------------------------------------------------------------- the driver


def _kind(ref: str) -> str:
    text = Path(ref, "models", "ncsnpp.py").read_text()
    return "jax" if "flax" in text else "torch"


def _check_table(configs: dict, which: str) -> None:
    sys.path.insert(0, str(ROOT))
    from probflow._score_sde_configs import SCORE_SDE_CONFIGS

    if set(configs) != set(SCORE_SDE_CONFIGS):
        raise SystemExit(f"config table and {which} disagree on the names: "
                         f"{sorted(set(configs) ^ set(SCORE_SDE_CONFIGS))}")
    for name, ref_cfg in configs.items():
        ours = json.loads(json.dumps(SCORE_SDE_CONFIGS[name]))  # tuples -> lists
        if ours != ref_cfg:
            raise SystemExit(f"config table entry {name} differs from {which}: "
                             f"{ours} != {ref_cfg}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", action="append", required=True,
                   help="a checkout of score_sde_pytorch or score_sde (give both)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        (_torch_worker if args.worker == "torch" else _jax_worker)(args.reference[0],
                                                                   Path(args.out))
        return 0
    refs = {_kind(r): os.path.abspath(r) for r in args.reference}
    if set(refs) != {"torch", "jax"}:
        p.error("give --reference for both score_sde_pytorch and score_sde")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for kind, ref in refs.items():
            worker = [sys.executable, os.path.abspath(__file__), "--worker", kind]
            subprocess.run([*worker, "--reference", ref, "--out", str(tmp)], check=True, cwd=ref)
            results[kind] = json.loads((tmp / f"{kind}.json").read_text())
            _check_table(results[kind]["configs"], f"the {kind} reference")
        if results["torch"]["counts"] != results["jax"]["counts"]:
            raise SystemExit("the two references' parameter counts differ")
        manifest = {
            "versions": {**results["torch"]["versions"], **results["jax"]["versions"]},
            "batch": BATCH,
            "full_size_parameter_counts": results["torch"]["counts"],
            "fixtures": {},
        }
        for fid, base, model_over, data_over in FIXTURES:
            jax_fix = results["jax"]["fixtures"][fid]
            b = np.load(tmp / f"{fid}.flax.npz")
            arrays = dict(x=b["x"], t=b["t"], flax_ema=b["score_ema"], flax_raw=b["score_raw"],
                          flax_ema64=np.load(tmp / f"{fid}.flax64.npy"))
            files = [(f"{fid}.msgpack", f"{fid}.msgpack.xz")]
            formats = ["flax"]
            if fid not in JAX_ONLY:
                torch_fix = results["torch"]["fixtures"][fid]
                if torch_fix["config"] != jax_fix["config"]:
                    raise SystemExit(f"{fid}: the references resolved different configs")
                a = np.load(tmp / f"{fid}.torch.npz")
                np.testing.assert_array_equal(a["x"], b["x"])
                arrays.update(torch_ema=a["score_ema"], torch_raw=a["score_raw"])
                files.append((f"{fid}.pth", f"{fid}.pth.xz"))
                formats.append("torch")
            np.savez_compressed(out / f"{fid}.npz", **arrays)
            for src, dst in files:
                (out / dst).write_bytes(lzma.compress((tmp / src).read_bytes()))
            manifest["fixtures"][fid] = {
                "base": base,
                "model": {k: _plain(v) for k, v in model_over.items()},
                "data": dict(data_over),
                "formats": formats,
                "reference_config": jax_fix["config"],
                "parameters": jax_fix["parameters"],
            }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(FIXTURES)} fixtures to {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
