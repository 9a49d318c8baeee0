"""The probability-flow ODE's exact computations: `probflow bpd`, `encode` and `decode`."""

from __future__ import annotations

import time
from pathlib import Path

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
)
from ._training import add_process_options, init_processes

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
    p.add_argument("--batch-size", type=positive_int, default=1000,
                   help="images per call of pf.bits_per_dim (and per key: results depend on it); "
                        "batches are split across the processes of a multi-process run")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (default: none)")
    add_process_options(p)


def _run_bpd(args) -> int:
    import jax

    import probflow as pf

    init_processes(args)  # a multi-process run splits the images across the processes

    loaded = load_args_model(args)
    ds = load_data(args.data, args.split, data_dir=args.data_dir)
    check_data_matches(ds, loaded)
    images = ds.images if args.limit is None else ds.images[: args.limit]
    n = int(images.shape[0])
    plan = ode_plan(args, lambda **given: pf.ODEOptions.bits_per_dim(loaded.sde, **given),
                    **({} if args.slots is None else {"scheduler": args.slots}))
    key = jax.random.key(args.seed)
    options = dict(num_bins=ds.num_bins, data_range=loaded.data_range, eps=args.eps,
                   trace=args.trace, options=plan)
    if args.trace != "exact":
        options["num_probes"] = args.probes
    t0 = time.perf_counter()
    repeats = []  # one result per repeat, over all images
    for r in range(args.repeats):
        # Batch i (from image i) uses fold_in(fold_in(key, r), i) for any process count.
        repeats.append(pf.distributed_bits_per_dim(
            loaded.model, loaded.sde, images, key=jax.random.fold_in(key, r),
            batch_size=args.batch_size, **options))
    elapsed = time.perf_counter() - t0
    nfe = np.concatenate([np.asarray(r.nfe) for r in repeats])
    summary = pf.summarize_bits_per_dim(repeats)
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
        "seed": args.seed, "wall_s": elapsed,
    }
    headers = ["model", "data", "images", "repeats", "trace", "bits/dim", "std err",
               "nfe mean", "nfe max", "time (s)"]
    probe = args.trace if args.trace == "exact" else f"{args.trace} x{args.probes}"
    rows = [[args.checkpoint, f"{args.data}/{args.split}", n, args.repeats, probe,
             f"{summary.mean:.4f}", f"{summary.sem:.4f}", round(float(nfe.mean()), 1),
             int(nfe.max()), round(elapsed, 1)]]
    if jax.process_index() == 0:  # in a multi-process run only process 0 reports
        print(format_table(headers, rows))
        print(f"\nbits/dim {summary}")
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


def _run_decode(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, ".png")
    npz = out_path(args.npz, ".npz", "--npz")
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
    if args.eps is None:
        args.eps = float(data["eps"]) if "eps" in data else 1e-3
    if args.checkpoint is None and args.config is None and str(data.get("config", "")):
        # The latents' own model: a paper checkpoint also needs its config and weights choice.
        args.config = str(data["config"])
        args.raw_weights = bool(data.get("raw_weights", False))
    loaded = load_args_model(args, checkpoint)
    if tuple(z.shape[1:]) != loaded.shape:
        raise CLIError(f"--latents: latents of shape {z.shape[1:]} do not fit the model's "
                       f"{loaded.shape}")
    start = time.perf_counter()
    dec = pf.decode(loaded.model, loaded.sde, z, **ode_kwargs(args))
    x = np.asarray(jax.block_until_ready(dec.x))
    elapsed = time.perf_counter() - start
    err = relative_error(x, data["x"]) if "x" in data else None
    if out is not None:
        pf.save_image_grid(out, x, data_range=loaded.data_range)
    if npz is not None:
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
        help="bits/dim of a model on a dataset split (PF-ODE likelihood)",
        description="Test-set bits/dim with uniform dequantization, from the probability-flow "
                    "ODE's likelihood (Hutchinson trace with Rademacher probes by default). "
                    "Prints the mean ± its standard error over images and, with --repeats > 1, "
                    "the spread between images apart from the estimator noise.",
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
