"""The probability-flow ODE's exact computations: `probflow bpd`, `encode` and `decode`."""

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
    check_data_matches,
    format_table,
    load_args_model,
    load_data,
    load_model_and_data,
    nonneg_int,
    ode_kwargs,
    ode_plan,
    out_path,
    positive_float,
    positive_int,
    relative_error,
    write_json,
    writing,
)
from ._processes import add_process_options, init_processes

TRACES = ("rademacher", "gaussian", "exact")

# ------------------------------------------------------------------------------------- bpd


def _slots(text: str):
    """`--slots N|auto|lockstep` as a scheduler object."""
    import probflow as pf

    if text == "lockstep":
        return pf.Lockstep()
    return pf.Refill("auto" if text == "auto" else positive_int(text))


def _slots_name(scheduler) -> str | int:
    import probflow as pf

    return scheduler.slots if isinstance(scheduler, pf.Refill) else "lockstep"


def _add_bpd(p) -> None:
    add_checkpoint_option(p, default=None, required=True)
    add_data_options(p, data=None, limit=None, limit_help="use the first N images")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="image batch i of repeat r uses the key fold_in(fold_in(key(seed), r), i) "
                        "for its dequantization noise and probes")
    p.add_argument("--repeats", type=positive_int, default=1, metavar="R",
                   help="dequantization draws per image (fresh noise and probes each); each "
                        "image's bits/dim is the mean over them")
    p.add_argument("--trace", choices=TRACES, default="rademacher",
                   help="the divergence: Hutchinson with Rademacher or Gaussian probes, or exact "
                        "(one JVP per dimension)")
    p.add_argument("--probes", type=positive_int, default=1, metavar="K",
                   help="Hutchinson probes per image and repeat")
    p.add_argument("--solver", default=None, metavar="NAME",
                   help="the ODE solver (adaptive: tsit5, dopri5, dopri8, bosh3, dpm2, dpm3; "
                        "default: pf.bits_per_dim's, dopri5; the paper's RK45 is dopri5)")
    p.add_argument("--time", choices=("t", "sqrt_t", "log_snr"), default=None,
                   help="the clock the ODE is solved in (default: pf.bits_per_dim's: sqrt_t "
                        "for VP models, else t; t for the dpm solvers; the paper's is t)")
    p.add_argument("--rtol", type=positive_float, default=None,
                   help="relative tolerance (default: pf.bits_per_dim's, 3e-4; the paper's is "
                        "1e-5)")
    p.add_argument("--atol", type=positive_float, default=None,
                   help="absolute tolerance (default: pf.bits_per_dim's, 3e-4; the paper's is "
                        "1e-5)")
    p.add_argument("--eps", type=positive_float, default=1e-5,
                   help="the time the likelihood is taken at, 0 < eps < T")
    p.add_argument("--slots", type=_slots, default=None, metavar="N|auto|lockstep",
                   help="examples solved at once; a finished example's slot takes the next "
                        "image of the batch, so the cost follows the mean NFE (auto: on CPU 64, "
                        "32 or 16 by image size, 1024 on accelerators; lockstep: the whole "
                        "batch in one solve; default: pf.bits_per_dim's, auto)")
    p.add_argument("--method", choices=("ode", "elbo"), default="ode",
                   help="ode: the probability-flow ODE's likelihood (the paper's); elbo: the "
                        "continuous-time variational bound (pf.elbo; no ODE solve, one score "
                        "evaluation per draw)")
    p.add_argument("--elbo-times", type=positive_int, default=256, metavar="N",
                   help="with --method elbo: draws of t per image (even)")
    p.add_argument("--dequantization", choices=("uniform", "truncated_normal"),
                   default="uniform",
                   help="uniform (the paper's) or truncated_normal (i-DODE: noise matched to "
                        "eps, a tighter bound on data that is discrete at the model's "
                        "resolution)")
    p.add_argument("--importance-samples", type=positive_int, default=1, metavar="K",
                   help="dequantization draws per image combined by log-mean-exp of p/q (a "
                        "bound for every K, tighter as K grows; costs K solves per image)")
    p.add_argument("--check-solver", type=nonneg_int, default=8, metavar="N",
                   help="solve N random images again at 100x tighter tolerances with the same "
                        "draws, pair them with their values, and print the solver's estimated "
                        "bias of the mean beside the standard error (0: skip; ignored with "
                        "--method elbo)")
    p.add_argument("--batch-size", type=positive_int, default=1000,
                   help="images per call of pf.bits_per_dim (image i draws from its own key, "
                        "so the results do not depend on it); batches are split across the "
                        "processes of a multi-process run")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (default: none)")
    add_process_options(p)


def _run_bpd(args) -> int:
    import jax

    import probflow as pf

    if args.process_id in (None, 0):  # the process that writes the results
        out_path(args.json, None, "--json")
    init_processes(args)  # a multi-process run splits the images across the processes

    loaded = load_args_model(args)
    ds = load_data(args.data, args.split, data_dir=args.data_dir)
    check_data_matches(ds, loaded)
    images = ds.images if args.limit is None else ds.images[: args.limit]
    n = int(images.shape[0])
    plan = ode_plan(args, lambda **given: pf.ODEOptions.bits_per_dim(loaded.sde, **given),
                    **({} if args.slots is None else {"scheduler": args.slots}))
    key = jax.random.key(args.seed)
    options: dict[str, Any] = dict(num_bins=ds.num_bins, data_range=loaded.data_range,
                                   eps=args.eps, trace=args.trace, options=plan)
    if args.method == "elbo":
        if args.elbo_times % 2:
            raise CLIError(f"--elbo-times must be even, got {args.elbo_times}")
        options["method"] = pf.VariationalBound(num_times=args.elbo_times)
    options["dequantization"] = args.dequantization
    options["importance_samples"] = args.importance_samples
    t0 = time.perf_counter()
    # The library's data-set evaluator: repeat r's batch i (from image i) uses fold_in(fold_in(key,
    # r), i) for any process count, the batches split across the processes; the solver check
    # has its own key, fold_in(key, repeats).
    ev = pf.evaluate_bits_per_dim(
        loaded.model, loaded.sde, images, key=key, repeats=args.repeats,
        num_probes=1 if args.trace == "exact" else args.probes, batch_size=args.batch_size,
        check_solver=(args.check_solver or None) if args.method == "ode" else None, **options)
    elapsed = time.perf_counter() - t0
    repeats, summary, check = ev.results, ev.summary, ev.solver
    nfe = np.concatenate([np.asarray(r.nfe) for r in repeats])
    result = {
        "checkpoint": str(args.checkpoint), "data": args.data, "split": args.split,
        "num_images": n, "repeats": args.repeats,
        # `bpd` and `bpd_se`: the mean and its standard error (everything it contains is
        # broken down in `summary`, see pf.summarize_bits_per_dim).
        "bpd": summary.mean, "bpd_se": summary.sem, "summary": summary.as_dict(),
        "bpd_per_repeat": [float(np.mean(r.bpd)) for r in repeats],
        "trace": args.trace, "probes": None if args.trace == "exact" else args.probes,
        "nfe_mean": float(nfe.mean()), "nfe_max": int(nfe.max()),
        "solver": args.solver or type(plan.solver).__name__.lower(), "time": plan.time.name,
        "slots": _slots_name(plan.scheduler), "rtol": float(plan.rtol),
        "atol": float(plan.atol), "eps": args.eps,
        "seed": args.seed, "wall_s": elapsed, "method": args.method,
        "dequantization": args.dequantization, "importance_samples": args.importance_samples,
        "solver_bias": None if check is None else check.bias,
        "solver_bias_se": None if check is None else check.bias_se,
        "solver_check": None if check is None else check.as_dict(),
    }
    headers = ["model", "data", "images", "repeats", "method", "bits/dim", "std err",
               "solver bias", "nfe mean", "nfe max", "time (s)"]
    if args.method == "elbo":
        how = f"elbo x{args.elbo_times}"
    else:
        how = args.trace if args.trace == "exact" else f"{args.trace} x{args.probes}"
    if args.dequantization != "uniform" or args.importance_samples > 1:
        how += f", {args.dequantization} K={args.importance_samples}"
    bias = "-" if check is None else f"{check.bias:+.4f} +- {check.bias_se:.4f}"
    rows = [[args.checkpoint, f"{args.data}/{args.split}", n, args.repeats, how,
             f"{summary.mean:.4f}", f"{summary.sem:.4f}", bias, round(float(nfe.mean()), 1),
             int(nfe.max()), round(elapsed, 1)]]
    if jax.process_index() == 0:  # in a multi-process run only process 0 reports
        print(format_table(headers, rows))
        print(f"\nbits/dim {summary}")
        if check is not None:
            print(f"solver: estimated bias of the mean {check.bias:+.4f} +- {check.bias_se:.4f} "
                  f"bits/dim from {check.num_images} images re-solved at rtol = atol / 100 "
                  f"(standard error {summary.sem:.4f})")
        write_json(args.json, result)
    return 0


# --------------------------------------------------------------------------- encode / decode


def _add_encode(p) -> None:
    add_checkpoint_option(p)
    add_data_options(p, limit=64, limit_help="encode the first N examples")
    add_ode_options(p)
    add_output_options(p, out=None, suffix=".npz", required=True,
                       out_help="the .npz file for the latents (z, x, labels, nfe, eps, "
                                "checkpoint, config)")


def _run_encode(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, ".npz")
    out_path(args.json, None, "--json")
    loaded, ds, x = load_model_and_data(args)
    n = len(x)
    kw = ode_kwargs(args)
    start = time.perf_counter()
    enc = pf.encode(loaded.model, loaded.sde, x, **kw)
    z = np.asarray(jax.block_until_ready(enc.z))
    t_enc = time.perf_counter() - start
    dec = pf.decode(loaded.model, loaded.sde, z, **kw)
    err = relative_error(dec.x, x)
    assert out is not None  # --out is required
    with writing("--out", out):
        np.savez(out, z=z, x=x, labels=np.asarray(ds.labels[:n]), nfe=np.asarray(enc.nfe),
                 eps=args.eps, checkpoint=args.checkpoint, config=args.config or "",
                 raw_weights=args.raw_weights)
    row = [args.checkpoint, n, round(float(np.mean(enc.nfe)), 1),
           round(float(np.mean(dec.nfe)), 1), f"{err.mean():.2e}", f"{err.max():.2e}",
           round(t_enc, 1), str(out)]
    print(format_table(["model", "images", "nfe enc", "nfe dec", "round-trip err mean", "max",
                        "time (s)", "out"], [row]))
    write_json(args.json, {"checkpoint": args.checkpoint, "images": n,
                           "nfe_encode_mean": float(np.mean(enc.nfe)),
                           "nfe_decode_mean": float(np.mean(dec.nfe)),
                           "round_trip_rel_error_mean": float(err.mean()),
                           "round_trip_rel_error_max": float(err.max()), "out": str(out)})
    return 0


def _add_decode(p) -> None:
    add_checkpoint_option(p, default=None,
                          help="a checkpoint file, run directory or shipped name (default: the "
                               "checkpoint recorded in the latents file)")
    p.add_argument("--latents", required=True, help="the .npz written by `probflow encode`")
    add_ode_options(p, eps=None,
                    eps_help="the time the ODE stops at (default: the eps recorded in the file)")
    add_output_options(p, out=None, out_help="PNG grid of the decoded images (default: none)")
    p.add_argument("--npz", default=None,
                   help="also save the decoded images as .npz (default: none)")


def _read_latents(name: str) -> dict:
    """The arrays of a latents file written by `probflow encode`, each checked: `z` a finite
    floating batch; `x` (optional) of z's shape; `eps` a number; `checkpoint` and `config`
    strings; `raw_weights` a bool."""
    path = Path(name)
    if not path.is_file():
        raise CLIError(f"--latents: no such file {name!r}")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # np.load reads .npy files too
            raise CLIError(f"--latents: {name!r} is a .npy array, not a latents .npz (written "
                           f"by probflow encode)")
        with f:
            arrays = {k: f[k] for k in f.files}
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(f"--latents: {name!r} is not a latents .npz ({e})") from None
    z = arrays.get("z")
    if z is None:
        raise CLIError(f"--latents: {name!r} holds no 'z' array (holds: "
                       f"{', '.join(arrays) or 'nothing'})")
    if z.dtype.kind != "f" or z.ndim < 2 or z.shape[0] < 1:
        raise CLIError(f"--latents: z must be a floating array [N, ...] with N >= 1, got dtype "
                       f"{z.dtype} and shape {z.shape}")
    bad = int(np.sum(~np.isfinite(z.reshape(len(z), -1)).all(axis=1)))
    if bad:
        raise CLIError(f"--latents: z holds NaN or inf values in {bad} of {len(z)} latents "
                       f"(encode the images again)")
    out: dict = {"z": z}
    x = arrays.get("x")
    if x is not None:
        if x.shape != z.shape or x.dtype.kind != "f":
            raise CLIError(f"--latents: x must be a floating array of z's shape {z.shape}, got "
                           f"{x.dtype} {x.shape}")
        out["x"] = x
    scalars = (("eps", "fi", float, "a number in (0, T)"), ("checkpoint", "U", str, "a name"),
               ("config", "U", str, "a name"), ("raw_weights", "b", bool, "true or false"))
    for key, kind, cast, what in scalars:
        if key not in arrays:
            continue
        v = arrays[key]
        if v.shape != () or v.dtype.kind not in kind:
            raise CLIError(f"--latents: {key} must be {what} (one {cast.__name__}), got an array "
                           f"of dtype {v.dtype} and shape {v.shape}")
        out[key] = cast(v.item())
    return out


def _run_decode(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, ".png")
    npz = out_path(args.npz, ".npz", "--npz")
    out_path(args.json, None, "--json")
    data = _read_latents(args.latents)
    z = data["z"]
    checkpoint = args.checkpoint or data.get("checkpoint")
    if checkpoint is None:
        raise CLIError("--checkpoint is required: the latents file does not name its model")
    if args.eps is None:
        args.eps = data.get("eps", 1e-3)
    if args.checkpoint is None and args.config is None and data.get("config"):
        # The latents' own model: a paper checkpoint also needs its config and weights choice.
        args.config = data["config"]
        args.raw_weights = data.get("raw_weights", False)
    loaded = load_args_model(args, checkpoint)
    if tuple(z.shape[1:]) != loaded.shape:
        raise CLIError(f"--latents: latents of shape {z.shape[1:]} do not fit the model's "
                       f"{loaded.shape}")
    start = time.perf_counter()
    dec = pf.decode(loaded.model, loaded.sde, z, **ode_kwargs(args))
    x = np.asarray(jax.block_until_ready(dec.x))
    elapsed = time.perf_counter() - start
    err = relative_error(x, data["x"]) if data.get("x") is not None else None
    if out is not None:
        with writing("--out", out):
            pf.save_image_grid(out, x, data_range=loaded.data_range)
    if npz is not None:
        with writing("--npz", npz):
            np.savez(npz, x=x)
    print(format_table(
        ["model", "latents", "nfe mean", "nfe max", "round-trip err mean", "time (s)"],
        [[checkpoint, len(z), round(float(np.mean(dec.nfe)), 1), int(np.max(dec.nfe)),
          "-" if err is None else f"{err.mean():.2e}", round(elapsed, 1)]],
    ))
    write_json(args.json, {"checkpoint": checkpoint, "latents": len(z),
                           "nfe_mean": float(np.mean(dec.nfe)),
                           "round_trip_rel_error_mean": None if err is None else float(err.mean()),
                           "out": str(out) if out else None})
    return 0


COMMANDS = (
    Command(
        name="bpd",
        help="bits/dim of a model on a dataset split (PF-ODE likelihood or the ELBO)",
        description="Test-set bits/dim with uniform (or truncated-normal, importance-weighted) "
                    "dequantization, from the probability-flow ODE's likelihood (Hutchinson "
                    "trace with Rademacher probes by default) or the variational bound. "
                    "Prints the mean ± its standard error over images, the solver's estimated "
                    "bias of the mean (--check-solver) and, with --repeats > 1, the spread "
                    "between images apart from the estimator noise.",
        add_arguments=_add_bpd,
        run=_run_bpd,
    ),
    Command(
        name="encode",
        help="encode images to latents (.npz)",
        description="Encode data to latents z = x(T) with the probability-flow ODE; reports the "
                    "decode(encode(x)) round-trip error.",
        add_arguments=_add_encode,
        run=_run_encode,
    ),
    Command(
        name="decode",
        help="decode latents (.npz) back to images",
        description="Decode latents with the probability-flow ODE from T to eps; if the file "
                    "holds the encoded data, report the round-trip error.",
        add_arguments=_add_decode,
        run=_run_decode,
    ),
)
