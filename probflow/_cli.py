"""The `probflow` command line.

Each subcommand is a pair: `_add_NAME(subparsers)` declaring its options and `_run_NAME(args)`
doing the work; `_SUBCOMMANDS` lists the pairs. A user's mistake raises `CLIError` (or
ValueError / FileNotFoundError / FileExistsError); `main` prints it as one line on stderr and
returns 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


class CLIError(Exception):
    """A user's mistake on the command line: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table with right-aligned columns."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _write_json(path: str | None, payload: dict) -> None:
    if path is None:
        return
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise CLIError(f"--json: directory does not exist: {p.parent}")
    p.write_text(json.dumps(payload, indent=2) + "\n")


def _make_sde(name: str):
    import probflow as pf

    return {"vp": pf.VPSDE, "subvp": pf.SubVPSDE, "ve": pf.VESDE}[name]()


def resolve_checkpoint(spec: str) -> Path:
    """A shipped model's name ("digits-vp") or a path, as the checkpoint's path."""
    from ._pretrained import PRETRAINED_NAMES, pretrained_path

    if spec in PRETRAINED_NAMES:
        return pretrained_path(spec)
    path = Path(spec)
    if not path.exists():
        raise CLIError(
            f"--checkpoint: no such file {spec!r} (and not a shipped model: "
            f"{', '.join(PRETRAINED_NAMES)})"
        )
    if path.is_dir():
        candidate = path / "checkpoint.eqx"
        if not candidate.exists():
            raise CLIError(f"--checkpoint: directory {spec!r} holds no checkpoint.eqx")
        return candidate
    return path


def load_data(name: str, split: str, data_dir=None):
    import probflow.data

    try:
        return probflow.data.load(name, split, data_dir=data_dir)
    except ValueError as e:
        raise CLIError(f"--data: {e}") from None


# ----------------------------------------------------------------------------------- train


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a score model by denoising score matching",
        description="Train a score model (DSM, eq. 7) with Adam, warm-up, clipping and an EMA; "
        "checkpoints are written atomically to OUT/checkpoint.eqx.",
    )
    p.add_argument("--data", help="a dataset name that probflow.data.load knows (required "
                   "unless --config gives it)")
    p.add_argument("--sde", choices=["vp", "subvp", "ve"], help="required unless --config")
    p.add_argument("--steps", type=_positive_int, help="total optimiser steps (required unless "
                   "--config)")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--checkpoint-every", type=_positive_int, default=1000)
    p.add_argument("--out", required=True, help="run directory (must not exist unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--model", choices=["unet", "mlp"], default="unet")
    p.add_argument("--channels", default="32,64", help="U-Net channels per level")
    p.add_argument("--num-res-blocks", type=_positive_int, default=1)
    p.add_argument("--width", type=_positive_int, default=256, help="MLP width")
    p.add_argument("--depth", type=_positive_int, default=3, help="MLP residual layers")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=5e-4)
    p.add_argument("--warmup", type=_nonneg_int, default=200)
    p.add_argument("--grad-clip", type=_positive_float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--likelihood-weighting", action="store_true", help="lambda = g^2 instead of std^2"
    )
    p.add_argument(
        "--no-importance-sampling",
        action="store_true",
        help="with --likelihood-weighting, draw t uniformly instead of ~ g^2/std^2",
    )
    p.add_argument(
        "--validation", type=_nonneg_int, default=0, help="hold out N training images"
    )
    p.add_argument("--steps-per-call", type=_positive_int, default=None,
                   help="steps per jitted call (default: 1 for unet, 50 for mlp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--config", default=None, metavar="NAME",
                   help="a paper configuration: ddpmpp-cifar10, ddpmpp-deep-cifar10, "
                   "subvp-ddpmpp-cifar10, ncsnpp-cifar10, ncsnpp-deep-cifar10 (network, SDE, "
                   "data, hyperparameters; docs/scaling.md); options given explicitly override it")
    p.add_argument("--devices", type=_positive_int, default=None,
                   help="train data-parallel on N devices (default: one device)")
    p.add_argument("--data-dir", default=None,
                   help="directory of prepared tensorflow-datasets data (tfds:NAME)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host runs)")


def _run_train(args) -> int:
    import jax

    from ._train import TrainConfig, train
    from .models import MLP, UNet

    if args.distributed:
        jax.distributed.initialize()
    if args.devices is not None:
        from ._distributed import select_devices

        try:
            select_devices(args.devices)
        except ValueError as e:
            raise CLIError(f"--devices: {e}") from None
    if args.config is not None:
        from ._paper import run_config

        return run_config(args)
    for option, value in (("--data", args.data), ("--sde", args.sde), ("--steps", args.steps)):
        if value is None:
            raise CLIError(f"{option} is required (unless --config NAME gives it)")
    if args.resume and not (Path(args.out) / "checkpoint.eqx").exists():
        raise CLIError(f"--resume: no checkpoint in {args.out} to resume from")
    ds = load_data(args.data, "train", data_dir=args.data_dir)
    if args.validation:
        ds, _ = ds.hold_out(args.validation, seed=0)
    sde = _make_sde(args.sde)
    key = jax.random.key(args.seed)
    if args.model == "unet":
        try:
            channels = tuple(int(c) for c in args.channels.split(","))
        except ValueError:
            raise CLIError(
                f"--channels: expected integers like 32,64, got {args.channels!r}"
            ) from None
        model = UNet(
            ds.shape, sde=sde, channels=channels, num_res_blocks=args.num_res_blocks, key=key
        )
    else:
        model = MLP(ds.shape, sde=sde, width=args.width, depth=args.depth, key=key)
    spc = args.steps_per_call or (1 if args.model == "unet" else 50)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        seed=args.seed,
        weighting="likelihood" if args.likelihood_weighting else "default",
        importance_sampling=args.likelihood_weighting and not args.no_importance_sampling,
        steps_per_call=spc,
        checkpoint_every=args.checkpoint_every,
    )
    t0 = time.perf_counter()
    result = train(
        model, sde, ds, config, out=args.out, resume=args.resume,
        progress=not args.no_progress, data_name=args.data, devices=args.devices,
    )
    elapsed = time.perf_counter() - t0
    tail = result.losses[-100:]
    rows = [
        ["run", str(args.out)],
        ["steps", result.step],
        ["final loss (mean of last 100)", float(tail.mean()) if len(tail) else float("nan")],
        ["wall time (s)", round(elapsed, 1)],
        ["checkpoint", str(Path(args.out) / "checkpoint.eqx")],
    ]
    print(format_table(["field", "value"], rows))
    return 0


# ------------------------------------------------------------------------------------- bpd


def _add_bpd(sub) -> None:
    p = sub.add_parser(
        "bpd",
        help="bits/dim of a model on a dataset split (PF-ODE likelihood)",
        description="Test-set bits/dim with uniform dequantization, from the probability-flow "
        "ODE's exact likelihood (Hutchinson trace).",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint path or a shipped name")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None,
                   help="directory of prepared tensorflow-datasets data (tfds:NAME)")
    p.add_argument("--limit", type=_positive_int, default=None, help="use the first N images")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--repeats", type=_positive_int, default=1, help="dequantization draws")
    p.add_argument("--rtol", type=_positive_float, default=1e-5)
    p.add_argument("--atol", type=_positive_float, default=1e-5)
    p.add_argument("--eps", type=_positive_float, default=1e-5)
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--json", default=None, help="also write the results as JSON here")


def _run_bpd(args) -> int:
    import jax
    import numpy as np

    import probflow as pf

    from ._checkpoint import load_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    model, sde, config = load_checkpoint(path)
    ds = load_data(args.data, args.split, data_dir=args.data_dir)
    if tuple(ds.shape) != tuple(model.shape):
        raise CLIError(
            f"--data {args.data}: examples have shape {tuple(ds.shape)} but the checkpoint's "
            f"model expects {tuple(model.shape)}"
        )
    if config.get("num_bins") not in (None, ds.num_bins):
        raise CLIError(
            f"--data {args.data} has {ds.num_bins} bins but the model was trained on "
            f"{config['num_bins']}"
        )
    data_range = tuple(config.get("data_range") or ds.data_range)
    images = ds.images if args.limit is None else ds.images[: args.limit]
    n = int(images.shape[0])
    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    per_repeat, nfes = [], []
    for r in range(args.repeats):
        bpd_r = []
        for i in range(0, n, args.batch_size):
            res = pf.bits_per_dim(
                model, sde, images[i : i + args.batch_size],
                key=jax.random.fold_in(jax.random.fold_in(key, r), i),
                num_bins=ds.num_bins, data_range=data_range,
                rtol=args.rtol, atol=args.atol, eps=args.eps,
            )
            bpd_r.append(np.asarray(res.bpd))
            nfes.append(np.asarray(res.nfe))
        per_repeat.append(np.concatenate(bpd_r))
    elapsed = time.perf_counter() - t0
    per_image = np.mean(per_repeat, axis=0)  # average the dequantization draws per image
    nfe = np.concatenate(nfes)
    bpd = float(per_image.mean())
    se = float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    result = {
        "checkpoint": str(args.checkpoint),
        "data": args.data,
        "split": args.split,
        "num_images": n,
        "repeats": args.repeats,
        "bpd": bpd,
        "bpd_se": se,
        "bpd_per_repeat": [float(b.mean()) for b in per_repeat],
        "nfe_mean": float(nfe.mean()),
        "nfe_max": int(nfe.max()),
        "rtol": args.rtol,
        "atol": args.atol,
        "eps": args.eps,
        "seed": args.seed,
        "wall_s": elapsed,
    }
    rows = [[args.checkpoint, f"{args.data}/{args.split}", n, args.repeats, bpd, se,
             round(float(nfe.mean()), 1), int(nfe.max()), round(elapsed, 1)]]
    headers = ["model", "data", "images", "repeats", "bits/dim", "std err", "nfe mean",
               "nfe max", "time (s)"]
    print(format_table(headers, rows))
    _write_json(args.json, result)
    return 0


# ------------------------------------------------------------------------------------ main

_SUBCOMMANDS = [
    ("train", _add_train, _run_train),
    ("bpd", _add_bpd, _run_bpd),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="probflow",
        description="Score-based generative modelling through SDEs (Song et al. 2021).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for _, add, _ in _all_subcommands():
        add(sub)
    return parser


def _all_subcommands():
    from ._cli_tools import SUBCOMMANDS

    return _SUBCOMMANDS + SUBCOMMANDS


def main(argv: list[str] | None = None) -> int:
    """The console entry point: `probflow COMMAND [options]`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = {name: fn for name, _, fn in _all_subcommands()}[args.command]
    from ._checkpoint import CheckpointError
    from ._train import TrainingDivergedError

    try:
        return int(run(args) or 0)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"probflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # run as `python -m probflow` (see __main__.py) to share one module
    from probflow._cli import main as _main

    sys.exit(_main())
