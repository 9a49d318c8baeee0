"""The `probflow` subcommands beyond training: sample, encode, decode, nfe-curve, inpaint,
colorize, train-classifier and demo.

Each is a pair `_add_NAME(subparsers)` / `_run_NAME(args)`, listed in `SUBCOMMANDS` and registered
by `_cli.build_parser`. Solvers are named by their diffrax class names (`tsit5`, `dopri5`, `heun`,
...) or probflow's exponential integrators (`dpm1`, `dpm2`, `dpm3`, `dpm++2m`, `dpm++3m`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ._cli import (
    CLIError,
    _nonneg_int,
    _positive_float,
    _positive_int,
    _write_json,
    format_table,
    load_data,
    resolve_checkpoint,
)

_ODE_SOLVERS = ("euler", "heun", "midpoint", "ralston", "bosh3", "tsit5", "dopri5", "dopri8",
                "reversibleheun")
_DPM_SOLVERS = ("dpm1", "dpm2", "dpm3", "dpm++2m", "dpm++3m")


def make_solver(name: str):
    """A solver object from its command-line name (case-insensitive diffrax class name)."""
    import diffrax

    import probflow as pf

    key = name.lower()
    if key in _ODE_SOLVERS:
        cls = {c.lower(): c for c in ("Euler", "Heun", "Midpoint", "Ralston", "Bosh3", "Tsit5",
                                      "Dopri5", "Dopri8", "ReversibleHeun")}[key]
        return getattr(diffrax, cls)()
    if key in ("dpm1", "dpm2", "dpm3"):
        return pf.DPMSolver(order=int(key[-1]))
    if key in ("dpm++2m", "dpm++3m"):
        return pf.DPMSolverMultistep(order=int(key[3]))
    raise CLIError(
        f"--solver: unknown solver {name!r}; choose from {', '.join(_ODE_SOLVERS + _DPM_SOLVERS)}"
    )


def _load_model(spec: str):
    from ._checkpoint import load_checkpoint

    model, sde, config = load_checkpoint(resolve_checkpoint(spec))
    data_range = tuple(config.get("data_range") or (0.0, 1.0))
    return model, sde, config, data_range


def _model_and_data(args):
    """The checkpoint's model and the first `--limit` examples of `--data` in its model space
    (bins' centres): (model, sde, config, data_range, dataset, x)."""
    model, sde, config, data_range = _load_model(args.checkpoint)
    ds = load_data(args.data, args.split)
    _check_data_matches(ds, model, config)
    n = min(args.limit, len(ds))
    lo, hi = data_range
    x = lo + (hi - lo) * (np.asarray(ds.images[:n], np.float32) + 0.5) / ds.num_bins
    return model, sde, config, data_range, ds, x


def _check_data_matches(ds, model, config, flag="--data"):
    if tuple(ds.shape) != tuple(model.shape):
        raise CLIError(
            f"{flag} {ds.name}: examples have shape {tuple(ds.shape)} but the checkpoint's model "
            f"expects {tuple(model.shape)}"
        )
    if config.get("num_bins") not in (None, ds.num_bins):
        raise CLIError(
            f"{flag} {ds.name} has {ds.num_bins} bins but the model was trained on "
            f"{config['num_bins']}"
        )


def _out_path(path: str | None, suffix: str, flag: str = "--out") -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise CLIError(f"{flag}: expected a {suffix} file name, got {path!r}")
    if not p.parent.exists():
        raise CLIError(f"{flag}: directory does not exist: {p.parent}")
    return p


def _ode_kwargs(args) -> dict:
    kw = dict(solver=make_solver(args.solver), rtol=args.rtol, atol=args.atol, steps=args.steps)
    return kw


def _add_solver_options(p, *, default_solver="tsit5", rtol=1e-5) -> None:
    p.add_argument("--solver", default=default_solver,
                   help=f"ODE solver: {', '.join(_ODE_SOLVERS + _DPM_SOLVERS)}")
    p.add_argument("--rtol", type=_positive_float, default=rtol)
    p.add_argument("--atol", type=_positive_float, default=rtol)
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="fixed uniform steps instead of adaptive tolerances")


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------- sample


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples (ODE, reverse SDE or PC) and write a PNG grid",
                       description="Draw samples from a score model and write them as a PNG grid.")
    p.add_argument("--checkpoint", default="digits-vp", help="a checkpoint path or a shipped name")
    p.add_argument("--sampler", choices=["ode", "sde", "pc"], default="ode")
    p.add_argument("--num", type=_positive_int, default=64, help="number of samples")
    _add_solver_options(p, rtol=1e-3)
    p.add_argument("--sde-steps", type=_positive_int, default=500,
                   help="steps of the reverse-SDE / PC samplers")
    p.add_argument("--snr", type=_positive_float, default=0.16, help="PC corrector snr")
    p.add_argument("--eps", type=_positive_float, default=1e-3)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", default=None, help="PNG file for the sample grid")
    p.add_argument("--npz", default=None, help="also save the samples as .npz")
    p.add_argument("--json", default=None)


def draw_samples(model, sde, shape, args, key):
    import probflow as pf

    if args.sampler == "ode":
        return pf.sample_ode(model, sde, args.num, shape, key=key, eps=args.eps,
                             **_ode_kwargs(args))
    if args.sampler == "sde":
        return pf.sample_sde(model, sde, args.num, shape, key=key, steps=args.sde_steps,
                             eps=args.eps)
    return pf.sample_pc(model, sde, args.num, shape, key=key, steps=args.sde_steps, eps=args.eps,
                        corrector=pf.LangevinCorrector(snr=args.snr, steps=1))


def _run_sample(args) -> int:
    import jax

    import probflow as pf

    out = _out_path(args.out, ".png")
    npz = _out_path(args.npz, ".npz", "--npz")
    model, sde, config, data_range = _load_model(args.checkpoint)
    start = time.perf_counter()
    r = draw_samples(model, sde, tuple(model.shape), args, jax.random.key(args.seed))
    x = np.asarray(jax.block_until_ready(r.x))
    elapsed = time.perf_counter() - start
    if out is not None:
        pf.save_image_grid(out, x, data_range=data_range)
    if npz is not None:
        np.savez(npz, x=x, nfe=np.asarray(r.nfe))
    nfe = np.asarray(r.nfe)
    print(format_table(
        ["model", "sampler", "samples", "nfe mean", "nfe max", "time (s)", "out"],
        [[args.checkpoint, args.sampler, args.num, round(float(nfe.mean()), 1), int(nfe.max()),
          round(elapsed, 1), str(out) if out else "-"]],
    ))
    _write_json(args.json, {"checkpoint": args.checkpoint, "sampler": args.sampler,
                            "num": args.num, "nfe_mean": float(nfe.mean()),
                            "nfe_max": int(nfe.max()), "wall_s": elapsed,
                            "out": str(out) if out else None})
    return 0


# --------------------------------------------------------------------------- encode / decode


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="encode images to latents (.npz)",
                       description="Encode data to latents z = x(T) with the probability-flow "
                                   "ODE; reports the decode(encode(x)) round-trip error.")
    p.add_argument("--checkpoint", default="digits-vp")
    p.add_argument("--data", default="digits")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=_positive_int, default=64)
    _add_solver_options(p)
    p.add_argument("--eps", type=_positive_float, default=1e-3)
    p.add_argument("--out", required=True, help="the .npz file for the latents")
    p.add_argument("--json", default=None)


def _run_encode(args) -> int:
    import jax

    import probflow as pf

    out = _out_path(args.out, ".npz")
    model, sde, config, data_range, ds, x = _model_and_data(args)
    n = len(x)
    lo, hi = data_range
    start = time.perf_counter()
    enc = pf.encode(model, sde, x, eps=args.eps, **_ode_kwargs(args))
    z = np.asarray(jax.block_until_ready(enc.z))
    t_enc = time.perf_counter() - start
    dec = pf.decode(model, sde, z, eps=args.eps, **_ode_kwargs(args))
    err = _relative_error(np.asarray(dec.x), x)
    np.savez(out, z=z, x=x, labels=np.asarray(ds.labels[:n]), nfe=np.asarray(enc.nfe),
             eps=args.eps, checkpoint=args.checkpoint)
    row = [args.checkpoint, n, round(float(np.mean(enc.nfe)), 1), round(float(np.mean(dec.nfe)),
           1), f"{err.mean():.2e}", f"{err.max():.2e}", round(t_enc, 1), str(out)]
    print(format_table(["model", "images", "nfe enc", "nfe dec", "round-trip err mean",
                        "max", "time (s)", "out"], [row]))
    _write_json(args.json, {"checkpoint": args.checkpoint, "images": n,
                            "nfe_encode_mean": float(np.mean(enc.nfe)),
                            "nfe_decode_mean": float(np.mean(dec.nfe)),
                            "round_trip_rel_error_mean": float(err.mean()),
                            "round_trip_rel_error_max": float(err.max()), "out": str(out)})
    return 0


def _relative_error(a, b):
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def _add_decode(sub) -> None:
    p = sub.add_parser("decode", help="decode latents (.npz) back to images",
                       description="Decode latents with the probability-flow ODE from T to eps; "
                                   "if the file holds the encoded data, report the error.")
    p.add_argument("--checkpoint", default=None,
                   help="defaults to the checkpoint recorded in the latents file")
    p.add_argument("--latents", required=True, help=".npz written by `probflow encode`")
    _add_solver_options(p)
    p.add_argument("--eps", type=_positive_float, default=None,
                   help="defaults to the eps recorded in the latents file")
    p.add_argument("--out", default=None, help="PNG grid of the decoded images")
    p.add_argument("--npz", default=None, help="also save the decoded images as .npz")
    p.add_argument("--json", default=None)


def _run_decode(args) -> int:
    import jax

    import probflow as pf

    out = _out_path(args.out, ".png")
    npz = _out_path(args.npz, ".npz", "--npz")
    path = Path(args.latents)
    if not path.exists():
        raise CLIError(f"--latents: no such file {args.latents!r}")
    try:
        data = np.load(path)
        z = data["z"]
    except Exception as e:
        raise CLIError(f"--latents: {args.latents!r} is not a latents .npz ({e})") from None
    checkpoint = args.checkpoint or (str(data["checkpoint"]) if "checkpoint" in data else None)
    if checkpoint is None:
        raise CLIError("--checkpoint is required: the latents file does not name its model")
    eps = args.eps if args.eps is not None else float(data["eps"]) if "eps" in data else 1e-3
    model, sde, config, data_range = _load_model(checkpoint)
    if tuple(z.shape[1:]) != tuple(model.shape):
        raise CLIError(f"--latents: latents of shape {z.shape[1:]} do not fit the model's "
                       f"{tuple(model.shape)}")
    start = time.perf_counter()
    dec = pf.decode(model, sde, z, eps=eps, **_ode_kwargs(args))
    x = np.asarray(jax.block_until_ready(dec.x))
    elapsed = time.perf_counter() - start
    err = _relative_error(x, data["x"]) if "x" in data else None
    if out is not None:
        pf.save_image_grid(out, x, data_range=data_range)
    if npz is not None:
        np.savez(npz, x=x)
    print(format_table(
        ["model", "latents", "nfe mean", "nfe max", "round-trip err mean", "time (s)"],
        [[checkpoint, len(z), round(float(np.mean(dec.nfe)), 1), int(np.max(dec.nfe)),
          "-" if err is None else f"{err.mean():.2e}", round(elapsed, 1)]],
    ))
    _write_json(args.json, {"checkpoint": checkpoint, "latents": len(z),
                            "nfe_mean": float(np.mean(dec.nfe)),
                            "round_trip_rel_error_mean": None if err is None else float(err.mean()),
                            "out": str(out) if out else None})
    return 0


# -------------------------------------------------------------------------------- nfe-curve


def _add_nfe_curve(sub) -> None:
    p = sub.add_parser("nfe-curve", help="NFE-versus-quality curves of ODE, SDE and PC samplers",
                       description="Sweep ODE solvers over tolerances or steps and the reverse-SDE "
                                   "and PC samplers over steps; measure solver error against a "
                                   "tight reference from the same latents, sliced Wasserstein "
                                   "and Frechet distances to held-out data, and |bpd - reference| "
                                   "of likelihood solves. Writes JSON rows and a PNG plot.")
    p.add_argument("--checkpoint", default="digits-vp")
    p.add_argument("--data", default="digits", help="held-out data for the distribution measures")
    p.add_argument("--split", default="test")
    p.add_argument("--num-samples", type=_positive_int, default=256)
    p.add_argument("--solvers", default="euler,midpoint,heun,bosh3,tsit5,dopri5,dopri8",
                   help="comma-separated ODE solvers")
    p.add_argument("--tolerances", default="1e-1,1e-2,1e-3,1e-4",
                   help="tolerances for adaptive solvers")
    p.add_argument("--step-counts", default="5,10,20,50,100",
                   help="step counts for solvers without an error estimate (and DPM solvers)")
    p.add_argument("--sde-steps", default="20,50,100,250",
                   help="step counts for the reverse-SDE and PC samplers ('' to skip)")
    p.add_argument("--likelihood-images", type=_nonneg_int, default=32,
                   help="test images for the |bpd - reference| curve (0 to skip)")
    p.add_argument("--eps", type=_positive_float, default=1e-3)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", default="nfe_curve.png", help="the PNG plot")
    p.add_argument("--json", default=None)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if any(not (math.isfinite(v) and v > 0) for v in vals):
        raise CLIError(f"{flag}: tolerances must be positive, got {text!r}")
    return vals


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise CLIError(f"{flag}: step counts must be >= 1, got {text!r}")
    return vals


def build_sweeps(solvers: str, tolerances, step_counts):
    """One sweep per solver: over `tolerances` for solvers with an error estimate (when any are
    given), otherwise over `step_counts`."""
    import probflow as pf

    from ._ode import _has_error_estimate

    sweeps = []
    for name in [s.strip() for s in solvers.split(",") if s.strip()]:
        solver = make_solver(name)
        adaptive = _has_error_estimate(solver) and not isinstance(
            solver, pf.AbstractExponentialIntegrator)
        if adaptive and tolerances:
            sweeps.append(pf.ODESweep(label=name.lower(), solver=solver, tolerances=tolerances))
        elif step_counts:
            sweeps.append(pf.ODESweep(label=name.lower(), solver=solver, steps=step_counts))
        else:
            raise CLIError(f"--solvers: {name} needs --step-counts (it has no error estimate)")
    return sweeps


def run_nfe_curve(model, sde, config, data_range, ds, *, num_samples, ode_sweeps,
                  stochastic_sweeps, likelihood_images, eps, seed, classifier):
    """The sampling rows and (with `likelihood_images`) the likelihood rows, for the same ODE
    solvers and settings."""
    import jax

    import probflow as pf

    lo, hi = data_range
    reference = lo + (hi - lo) * (np.asarray(ds.images, np.float32) + 0.5) / ds.num_bins
    n_ode = sum(len(s.tolerances) + len(s.steps) for s in ode_sweeps)
    total = 1 + n_ode + sum(len(s.steps) for s in stochastic_sweeps)
    total += (1 + n_ode) if likelihood_images else 0
    bar = _progress(total, "nfe-curve")

    def tick(msg):
        bar.set_postfix_str(msg)
        bar.update(1)

    rows = pf.nfe_curve(
        model, sde, tuple(model.shape), key=jax.random.key(seed), num_samples=num_samples,
        ode_sweeps=ode_sweeps, stochastic_sweeps=stochastic_sweeps, reference_data=reference,
        classifier=classifier, eps=eps, clip=(lo, hi), progress=tick,
    )
    lik_rows = None
    if likelihood_images:
        lik_rows = pf.likelihood_curve(
            model, sde, ds.images[:likelihood_images], key=jax.random.key(seed + 1),
            num_bins=ds.num_bins, data_range=data_range, sweeps=ode_sweeps, progress=tick,
        )
    bar.close()
    return rows, lik_rows


def _digits_classifier_for(ds):
    import probflow as pf

    if ds.name == "digits":
        return pf.load_pretrained_classifier("digits-classifier")
    return None


def _run_nfe_curve(args) -> int:
    import probflow as pf

    out = _out_path(args.out, ".png")
    model, sde, config, data_range = _load_model(args.checkpoint)
    ds = load_data(args.data, args.split)
    _check_data_matches(ds, model, config)
    sweeps = build_sweeps(args.solvers, _floats(args.tolerances, "--tolerances"),
                          _ints(args.step_counts, "--step-counts"))
    sde_steps = _ints(args.sde_steps, "--sde-steps") if args.sde_steps.strip() else ()
    stochastic = [] if not sde_steps else [
        pf.StochasticSweep(label="reverse-sde", kind="sde", steps=sde_steps),
        pf.StochasticSweep(label="pc", kind="pc", steps=sde_steps),
    ]
    rows, lik = run_nfe_curve(
        model, sde, config, data_range, ds, num_samples=args.num_samples, ode_sweeps=sweeps,
        stochastic_sweeps=stochastic, likelihood_images=args.likelihood_images, eps=args.eps,
        seed=args.seed, classifier=_digits_classifier_for(ds),
    )
    pf.plot_nfe_curve(rows, out, likelihood_rows=lik, title=f"{args.checkpoint} on {args.data}")
    from ._curves import format_table as curve_table

    print(curve_table(rows, ["sampler", "setting", "nfe_mean", "nfe_max", "solver_error",
                             "sliced_wasserstein", "frechet"]))
    if lik:
        print()
        print(curve_table(lik, ["sampler", "setting", "nfe_mean", "bpd", "bpd_error"]))
    print(f"\nplot: {out}")
    _write_json(args.json, {"checkpoint": args.checkpoint, "rows": rows, "likelihood_rows": lik,
                            "plot": str(out)})
    return 0


# ---------------------------------------------------------------------- inpaint / colorize


def make_mask(kind: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A mask (1 = known) of one example's shape [H, W, C]: left/right/top/bottom (the half that
    is KEPT is named, e.g. "left" keeps the left half), center (a hidden centre square), random
    (half the pixels kept), or a PNG file (white = known)."""
    h, w = shape[0], shape[1]
    m = np.zeros((h, w), np.float32)
    if kind == "left":
        m[:, : w // 2] = 1
    elif kind == "right":
        m[:, w // 2:] = 1
    elif kind == "top":
        m[: h // 2] = 1
    elif kind == "bottom":
        m[h // 2:] = 1
    elif kind == "center":
        m[:] = 1
        m[h // 4: h - h // 4, w // 4: w - w // 4] = 0
    elif kind == "random":
        m = (np.random.default_rng(seed).random((h, w)) < 0.5).astype(np.float32)
    elif kind.lower().endswith(".png"):
        from PIL import Image

        if not Path(kind).exists():
            raise CLIError(f"--mask: no such file {kind!r}")
        img = np.asarray(Image.open(kind).convert("L").resize((w, h), Image.NEAREST))
        m = (img >= 128).astype(np.float32)
    else:
        raise CLIError(f"--mask: unknown mask {kind!r}; choose left, right, top, bottom, center, "
                       "random or a PNG file")
    return np.broadcast_to(m[:, :, None], shape).copy()


def _add_inpaint(sub) -> None:
    p = sub.add_parser("inpaint", help="inpaint masked images and write a PNG grid",
                       description="Inpaint test images (paper appendix I): rows of input, "
                                   "masked input and result.")
    p.add_argument("--checkpoint", default="digits-vp")
    p.add_argument("--data", default="digits")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=_positive_int, default=16)
    p.add_argument("--mask", default="left",
                   help="the KNOWN region: left, right, top, bottom, center, random, or a PNG")
    p.add_argument("--steps", type=_positive_int, default=500)
    p.add_argument("--particles", type=_positive_int, default=1,
                   help=">1: sequential Monte Carlo with this many particles (exact as it grows)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", default="inpaint.png")
    p.add_argument("--json", default=None)


def _run_inpaint(args) -> int:
    import jax

    import probflow as pf

    out = _out_path(args.out, ".png")
    model, sde, config, data_range, ds, x = _model_and_data(args)
    n = len(x)
    lo, hi = data_range
    mask = make_mask(args.mask, tuple(model.shape), args.seed)
    opts = {} if args.particles == 1 else {"corrector": None}
    start = time.perf_counter()
    r = pf.inpaint(model, sde, x, mask, key=jax.random.key(args.seed), steps=args.steps,
                   num_particles=args.particles, **opts)
    res = np.asarray(jax.block_until_ready(r.x))
    elapsed = time.perf_counter() - start
    masked = np.where(mask > 0, x, lo)
    pf.save_image_grid(out, np.concatenate([x, masked, res]), data_range=data_range, ncol=n)
    row = [args.checkpoint, n, args.mask, args.particles, round(float(np.mean(r.nfe)), 1),
           round(elapsed, 1), str(out)]
    result = {"checkpoint": args.checkpoint, "images": n, "mask": args.mask,
              "particles": args.particles, "nfe_mean": float(np.mean(r.nfe)),
              "wall_s": elapsed, "out": str(out)}
    clf = _digits_classifier_for(ds)
    if clf is not None:
        acc = float(np.mean(np.asarray(pf.classify(clf, np.clip(res, lo, hi))) ==
                            np.asarray(ds.labels[:n])))
        result["classifier_accuracy"] = acc
        row.insert(5, f"{acc:.3f}")
    headers = ["model", "images", "mask", "particles", "nfe mean"]
    headers += ["clf acc"] if clf is not None else []
    print(format_table(headers + ["time (s)", "out (rows: input, masked, result)"], [row]))
    _write_json(args.json, result)
    return 0


def _add_colorize(sub) -> None:
    p = sub.add_parser("colorize", help="colorize grey images with a colour model",
                       description="Colorize grey images (appendix I): the grey axis of an "
                                   "orthogonal colour basis is kept, the colour axes inpainted.")
    p.add_argument("--checkpoint", default="digits-color-vp",
                   help="a model trained on colour (3-channel) data")
    p.add_argument("--data", default="digits-color",
                   help="colour data; their grey versions are colorized")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=_positive_int, default=16)
    p.add_argument("--steps", type=_positive_int, default=500)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", default="colorize.png")
    p.add_argument("--json", default=None)


def _run_colorize(args) -> int:
    import jax

    import probflow as pf

    out = _out_path(args.out, ".png")
    model, sde, config, data_range = _load_model(args.checkpoint)
    if tuple(model.shape)[-1] != 3:
        raise CLIError(f"--checkpoint: colorize needs a colour model (3 channels), this one "
                       f"expects examples of shape {tuple(model.shape)}")
    ds = load_data(args.data, args.split)
    _check_data_matches(ds, model, config)
    n = min(args.limit, len(ds))
    lo, hi = data_range
    x = lo + (hi - lo) * (np.asarray(ds.images[:n], np.float32) + 0.5) / ds.num_bins
    gray = x.mean(-1, keepdims=True)
    start = time.perf_counter()
    r = pf.colorize(model, sde, gray, key=jax.random.key(args.seed), steps=args.steps)
    res = np.asarray(jax.block_until_ready(r.x))
    elapsed = time.perf_counter() - start
    grey_err = float(np.max(np.abs(res.mean(-1, keepdims=True) - gray)))
    pf.save_image_grid(out, np.concatenate([x, np.repeat(gray, 3, -1), res]),
                       data_range=data_range, ncol=n)
    print(format_table(["model", "images", "nfe mean", "max |grey err|", "time (s)",
                        "out (rows: original, grey, colorized)"],
                       [[args.checkpoint, n, round(float(np.mean(r.nfe)), 1), f"{grey_err:.1e}",
                         round(elapsed, 1), str(out)]]))
    _write_json(args.json, {"checkpoint": args.checkpoint, "images": n,
                            "nfe_mean": float(np.mean(r.nfe)), "max_grey_error": grey_err,
                            "out": str(out)})
    return 0


# ------------------------------------------------------------------------ train-classifier


def _add_train_classifier(sub) -> None:
    p = sub.add_parser("train-classifier", help="train a (noise-conditional) classifier",
                       description="Train a classifier on a labelled dataset: clean data, or, "
                                   "with --sde, noisy x_t at random t for class-conditional "
                                   "sampling (eq. 14).")
    p.add_argument("--data", default="digits")
    p.add_argument("--sde", choices=["none", "vp", "subvp", "ve"], default="vp")
    p.add_argument("--steps", type=_positive_int, default=10000)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", required=True, help="the classifier file to write (.eqx)")
    p.add_argument("--json", default=None)


def _run_train_classifier(args) -> int:
    import jax
    import jax.numpy as jnp

    import probflow as pf

    from ._cli import _make_sde

    out = _out_path(args.out, ".eqx")
    train = load_data(args.data, "train")
    test = load_data(args.data, "test")
    sde = None if args.sde == "none" else _make_sde(args.sde)
    cfg = pf.ClassifierConfig(steps=args.steps, batch_size=args.batch_size,
                              learning_rate=args.lr, seed=args.seed)
    start = time.perf_counter()
    clf = pf.train_classifier(train.images, train.labels, num_bins=train.num_bins,
                              data_range=train.data_range, sde=sde, config=cfg)
    elapsed = time.perf_counter() - start
    x = test.to_model_space()
    t = 0.0 if sde is None else 1e-3
    if sde is not None:
        scale, std = sde.marginal(t)
        x = scale * x + std * jax.random.normal(jax.random.key(0), x.shape)
    acc = float(jnp.mean(pf.classify(clf, x, t) == test.labels))
    pf.save_classifier(out, clf, {"data": args.data, "sde": args.sde, "test_accuracy": acc})
    print(format_table(["data", "sde", "steps", "test acc", "time (s)", "out"],
                       [[args.data, args.sde, args.steps, f"{acc:.3f}", round(elapsed, 1),
                         str(out)]]))
    _write_json(args.json, {"data": args.data, "sde": args.sde, "test_accuracy": acc,
                            "out": str(out)})
    return 0


# ------------------------------------------------------------------------------------ demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the shipped digits model (< 5 minutes)",
                       description="On the shipped digits-vp model: test-set bits/dim, sample "
                                   "grids from the ODE, SDE and PC samplers, the encode->decode "
                                   "error and a compact NFE-versus-quality curve. Writes PNGs and "
                                   "summary.json into --out and prints a table.")
    p.add_argument("--checkpoint", default="digits-vp")
    p.add_argument("--out", default="demo-out", help="output folder (created if missing)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--bpd-images", type=_positive_int, default=300,
                   help="test images for bits/dim (300 = the whole test split)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few images, samples and steps (for tests)")
    p.add_argument("--json", default=None, help="also write the summary here")


def _run_demo(args) -> int:
    import jax

    import probflow as pf

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {args.out!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, sde, config, data_range = _load_model(args.checkpoint)
    test = load_data("digits", "test")
    _check_data_matches(test, model, config, "digits")
    lo, hi = data_range
    key = jax.random.key(args.seed)
    summary: dict = {"checkpoint": args.checkpoint}
    table = []
    steps_total = 6
    bar = _progress(steps_total, "demo")

    # 1. Test-set bits/dim (uniform dequantization, rtol = atol = 1e-5, eps = 1e-5).
    n_bpd = min(args.bpd_images if not args.quick else 8, len(test))
    num, sde_steps = (64, 500) if not args.quick else (8, 10)
    t0 = time.perf_counter()
    r = pf.bits_per_dim(model, sde, test.images[:n_bpd], key=jax.random.fold_in(key, 1),
                        num_bins=test.num_bins, data_range=data_range)
    bpd = np.asarray(jax.block_until_ready(r.bpd))
    se = float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    summary["bpd"] = {"mean": float(bpd.mean()), "se": se, "images": n_bpd,
                      "nfe_mean": float(np.mean(r.nfe)), "nfe_max": int(np.max(r.nfe)),
                      "seconds": time.perf_counter() - t0}
    table.append(["test bits/dim", f"{bpd.mean():.4f} ± {se:.4f}",
                  f"{np.mean(r.nfe):.0f} / {np.max(r.nfe)}", round(time.perf_counter() - t0, 1),
                  "-"])
    bar.update(1)

    # 2-4. Sample grids from the three samplers.
    shape = tuple(model.shape)
    samplers = [
        ("ODE samples (tsit5, tol 1e-3)", "samples_ode.png",
         lambda k: pf.sample_ode(model, sde, num, shape, key=k, rtol=1e-3, atol=1e-3)),
        (f"SDE samples (Euler-Maruyama, {sde_steps} steps)", "samples_sde.png",
         lambda k: pf.sample_sde(model, sde, num, shape, key=k, steps=sde_steps)),
        (f"PC samples (RD + Langevin, {sde_steps // 2} steps)", "samples_pc.png",
         lambda k: pf.sample_pc(model, sde, num, shape, key=k, steps=sde_steps // 2)),
    ]
    summary["samples"] = {}
    for i, (name, fname, fn) in enumerate(samplers):
        t0 = time.perf_counter()
        s = fn(jax.random.fold_in(key, 10 + i))
        x = np.asarray(jax.block_until_ready(s.x))
        pf.save_image_grid(out / fname, x, data_range=data_range)
        dt = time.perf_counter() - t0
        summary["samples"][fname] = {"nfe_mean": float(np.mean(s.nfe)), "seconds": dt}
        table.append([name, "-", f"{np.mean(s.nfe):.0f} / {np.max(s.nfe)}", round(dt, 1),
                      str(out / fname)])
        bar.update(1)

    # 5. Encode -> decode round trip on test images.
    t0 = time.perf_counter()
    x = lo + (hi - lo) * (np.asarray(test.images[:num], np.float32) + 0.5) / test.num_bins
    enc = pf.encode(model, sde, x)
    dec = pf.decode(model, sde, enc.z)
    err = _relative_error(np.asarray(dec.x), x)
    pf.save_image_grid(out / "encode_decode.png", np.concatenate([x[:16], np.asarray(dec.x[:16])]),
                       data_range=data_range, ncol=16)
    summary["encode_decode"] = {"rel_error_mean": float(err.mean()),
                                "rel_error_max": float(err.max()),
                                "nfe_encode_mean": float(np.mean(enc.nfe)),
                                "nfe_decode_mean": float(np.mean(dec.nfe))}
    table.append(["encode->decode rel. error", f"{err.mean():.1e} (max {err.max():.1e})",
                  f"{np.mean(enc.nfe):.0f} + {np.mean(dec.nfe):.0f}",
                  round(time.perf_counter() - t0, 1), str(out / "encode_decode.png")])
    bar.update(1)

    # 6. A compact NFE-versus-quality curve.
    t0 = time.perf_counter()
    if args.quick:
        sweeps = build_sweeps("euler", (), (4,)) + build_sweeps("tsit5", (1e-2,), ())
        sde_sweep = (5,)
    else:
        sweeps = build_sweeps("euler,heun", (), (10, 20, 50)) + build_sweeps(
            "tsit5", (1e-2, 1e-3, 1e-4), ())
        sde_sweep = (50, 200)
    rows, _ = run_nfe_curve(
        model, sde, config, data_range, test, num_samples=num * 2, ode_sweeps=sweeps,
        stochastic_sweeps=[pf.StochasticSweep(label="reverse-sde", kind="sde", steps=sde_sweep)],
        likelihood_images=0, eps=1e-3, seed=args.seed,
        classifier=pf.load_pretrained_classifier("digits-classifier"),
    )
    pf.plot_nfe_curve(rows, out / "nfe_curve.png", title=f"{args.checkpoint}: NFE vs quality")
    summary["nfe_curve"] = rows
    table.append(["NFE-vs-quality curve", f"{len(rows)} settings", "-",
                  round(time.perf_counter() - t0, 1), str(out / "nfe_curve.png")])
    bar.update(1)
    bar.close()

    summary["seconds_total"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_json(args.json, summary)
    print(format_table(["result", "value", "NFE mean / max", "time (s)", "file"], table))
    from ._curves import format_table as curve_table

    print()
    print(curve_table(rows, ["sampler", "setting", "nfe_mean", "solver_error",
                             "sliced_wasserstein", "frechet"]))
    print(f"\ntotal {summary['seconds_total']:.0f} s; summary: {out / 'summary.json'}")
    return 0


SUBCOMMANDS = [
    ("sample", _add_sample, _run_sample),
    ("encode", _add_encode, _run_encode),
    ("decode", _add_decode, _run_decode),
    ("nfe-curve", _add_nfe_curve, _run_nfe_curve),
    ("inpaint", _add_inpaint, _run_inpaint),
    ("colorize", _add_colorize, _run_colorize),
    ("train-classifier", _add_train_classifier, _run_train_classifier),
    ("demo", _add_demo, _run_demo),
]
