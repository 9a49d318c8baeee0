"""Sampling and controllable generation: `probflow sample`, `inpaint` and `colorize`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    CLIError,
    Command,
    add_checkpoint_option,
    add_data_options,
    add_ode_options,
    add_output_options,
    digits_classifier_for,
    format_table,
    load_args_model,
    load_model_and_data,
    nonneg_int,
    ode_kwargs,
    out_path,
    positive_float,
    positive_int,
    write_json,
    writing,
)


def add_sde_steps_option(p, default: int, what: str) -> None:
    p.add_argument("--sde-steps", "--steps", dest="sde_steps", type=positive_int, default=default,
                   metavar="N", help=f"discretisation steps (noise levels) of {what}")


# ----------------------------------------------------------------------------------- sample


def _add_sample(p) -> None:
    add_checkpoint_option(p)
    p.add_argument("--sampler", choices=["ode", "sde", "pc"], default="ode",
                   help="probability-flow ODE, reverse SDE (Euler-Maruyama), or predictor-"
                        "corrector (reverse diffusion + Langevin)")
    p.add_argument("--num", type=positive_int, default=64, help="number of samples")
    g = p.add_argument_group("ODE sampler")
    add_ode_options(g, preset="pf.ODEOptions.sampling()'s",
                    eps_help="the time every sampler stops at (data end), 0 < eps < T")
    g = p.add_argument_group("SDE and PC samplers")
    g.add_argument("--sde-steps", type=positive_int, default=500, metavar="N",
                   help="discretisation steps (noise levels) of the reverse-SDE and PC samplers")
    g.add_argument("--snr", type=positive_float, default=0.16,
                   help="signal-to-noise ratio of the PC sampler's Langevin corrector")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the prior draws and noise")
    add_output_options(p, out=None, out_help="PNG file for the sample grid (default: none)")
    p.add_argument("--npz", default=None, help="also save the samples as .npz (default: none)")


def draw_samples(loaded, args, key):
    """The samples of `args.sampler` (shared by `sample` and the demo)."""
    import probflow as pf

    model, sde, shape = loaded.model, loaded.sde, loaded.shape
    if args.sampler == "ode":
        return pf.sample_ode(model, sde, args.num, shape, key=key,
                             **ode_kwargs(args, pf.ODEOptions.sampling))
    if args.sampler == "sde":
        return pf.sample_sde(model, sde, args.num, shape, key=key, steps=args.sde_steps,
                             eps=args.eps)
    return pf.sample_pc(model, sde, args.num, shape, key=key, steps=args.sde_steps, eps=args.eps,
                        corrector=pf.LangevinCorrector(snr=args.snr, steps=1))


def _run_sample(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, ".png")
    npz = out_path(args.npz, ".npz", "--npz")
    out_path(args.json, None, "--json")
    loaded = load_args_model(args)
    start = time.perf_counter()
    r = draw_samples(loaded, args, jax.random.key(args.seed))
    x = np.asarray(jax.block_until_ready(r.x))
    elapsed = time.perf_counter() - start
    if out is not None:
        with writing("--out", out):
            pf.save_image_grid(out, x, data_range=loaded.data_range)
    if npz is not None:
        with writing("--npz", npz):
            np.savez(npz, x=x, nfe=np.asarray(r.nfe))
    nfe = np.asarray(r.nfe)
    print(format_table(
        ["model", "sampler", "samples", "nfe mean", "nfe max", "time (s)", "out"],
        [[args.checkpoint, args.sampler, args.num, round(float(nfe.mean()), 1), int(nfe.max()),
          round(elapsed, 1), str(out) if out else "-"]],
    ))
    write_json(args.json, {"checkpoint": args.checkpoint, "sampler": args.sampler,
                           "num": args.num, "nfe_mean": float(nfe.mean()),
                           "nfe_max": int(nfe.max()), "wall_s": elapsed,
                           "out": str(out) if out else None})
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
        try:
            img = np.asarray(
                Image.open(kind).convert("L").resize((w, h), Image.Resampling.NEAREST)
            )
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise CLIError(f"--mask: cannot read {kind!r} as an image ({e})") from None
        m = (img >= 128).astype(np.float32)
    else:
        raise CLIError(f"--mask: unknown mask {kind!r}; choose left, right, top, bottom, center, "
                       "random or a PNG file")
    return np.broadcast_to(m[:, :, None], shape).copy()


def _add_inpaint(p) -> None:
    add_checkpoint_option(p)
    add_data_options(p, limit=16, limit_help="inpaint the first N images")
    p.add_argument("--mask", default="left",
                   help="the KNOWN region: left, right, top, bottom, center, random, or a PNG "
                        "file (white = known)")
    add_sde_steps_option(p, 500, "the predictor-corrector sampler")
    p.add_argument("--particles", type=positive_int, default=1,
                   help=">1: sequential Monte Carlo with this many particles (exact as it grows)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the noise (and the mask)")
    add_output_options(p, out="inpaint.png",
                       out_help="the PNG grid (rows: input, masked input, result)")


def _run_inpaint(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, ".png")
    out_path(args.json, None, "--json")
    loaded, ds, x = load_model_and_data(args)
    n = len(x)
    lo, hi = loaded.data_range
    mask = make_mask(args.mask, loaded.shape, args.seed)
    opts: dict[str, Any] = {} if args.particles == 1 else {"corrector": None}
    start = time.perf_counter()
    r = pf.inpaint(loaded.model, loaded.sde, x, mask, key=jax.random.key(args.seed),
                   steps=args.sde_steps, num_particles=args.particles, **opts)
    res = np.asarray(jax.block_until_ready(r.x))
    elapsed = time.perf_counter() - start
    masked = np.where(mask > 0, x, lo)
    with writing("--out", out):
        pf.save_image_grid(out, np.concatenate([x, masked, res]),
                           data_range=loaded.data_range, ncol=n)
    row = [args.checkpoint, n, args.mask, args.particles, round(float(np.mean(r.nfe)), 1),
           round(elapsed, 1), str(out)]
    result = {"checkpoint": args.checkpoint, "images": n, "mask": args.mask,
              "particles": args.particles, "nfe_mean": float(np.mean(r.nfe)),
              "wall_s": elapsed, "out": str(out)}
    clf = digits_classifier_for(ds)
    if clf is not None:
        acc = float(np.mean(np.asarray(pf.classify(clf, np.clip(res, lo, hi))) ==
                            np.asarray(ds.labels[:n])))
        result["classifier_accuracy"] = acc
        row.insert(5, f"{acc:.3f}")
    headers = ["model", "images", "mask", "particles", "nfe mean"]
    headers += ["clf acc"] if clf is not None else []
    print(format_table(headers + ["time (s)", "out (rows: input, masked, result)"], [row]))
    write_json(args.json, result)
    return 0


def _add_colorize(p) -> None:
    add_checkpoint_option(p, default="digits-color-vp",
                          help="a model trained on colour (3-channel) data: a checkpoint file, "
                               "run directory or shipped name")
    add_data_options(p, data="digits-color", limit=16, limit_help="colorize the first N images")
    add_sde_steps_option(p, 500, "the predictor-corrector sampler")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the noise")
    add_output_options(p, out="colorize.png",
                       out_help="the PNG grid (rows: original, grey, colorized)")


def _run_colorize(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, ".png")
    out_path(args.json, None, "--json")

    def colour(loaded):
        if loaded.shape[-1] != 3:
            raise CLIError(f"--checkpoint: colorize needs a colour model (3 channels), this one "
                           f"expects examples of shape {loaded.shape}")

    loaded, ds, x = load_model_and_data(args, colour)
    n = len(x)
    gray = x.mean(-1, keepdims=True)
    start = time.perf_counter()
    r = pf.colorize(loaded.model, loaded.sde, gray, key=jax.random.key(args.seed),
                    steps=args.sde_steps)
    res = np.asarray(jax.block_until_ready(r.x))
    elapsed = time.perf_counter() - start
    grey_err = float(np.max(np.abs(res.mean(-1, keepdims=True) - gray)))
    with writing("--out", out):
        pf.save_image_grid(out, np.concatenate([x, np.repeat(gray, 3, -1), res]),
                           data_range=loaded.data_range, ncol=n)
    print(format_table(["model", "images", "nfe mean", "max |grey err|", "time (s)",
                        "out (rows: original, grey, colorized)"],
                       [[args.checkpoint, n, round(float(np.mean(r.nfe)), 1), f"{grey_err:.1e}",
                         round(elapsed, 1), str(out)]]))
    write_json(args.json, {"checkpoint": args.checkpoint, "images": n,
                           "nfe_mean": float(np.mean(r.nfe)), "max_grey_error": grey_err,
                           "out": str(out)})
    return 0


COMMANDS = (
    Command(
        name="sample",
        help="draw samples (ODE, reverse SDE or PC) and write a PNG grid",
        description="Draw samples from a score model and write them as a PNG grid.",
        add_arguments=_add_sample,
        run=_run_sample,
    ),
    Command(
        name="inpaint",
        help="inpaint masked images and write a PNG grid",
        description="Inpaint test images (paper appendix I): rows of input, masked input and "
                    "result; on digits, the shipped classifier's accuracy on the results.",
        add_arguments=_add_inpaint,
        run=_run_inpaint,
    ),
    Command(
        name="colorize",
        help="colorize grey images with a colour model",
        description="Colorize grey images (appendix I): the grey axis of an orthogonal colour "
                    "basis is kept, the colour axes inpainted.",
        add_arguments=_add_colorize,
        run=_run_colorize,
    ),
)
