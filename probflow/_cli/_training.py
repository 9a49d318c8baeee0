"""`probflow train` (score models, optionally from a training preset) and
`probflow train-classifier`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from . import _signals
from ._common import (
    SDE_NAMES,
    CLIError,
    Command,
    add_output_options,
    format_table,
    load_data,
    make_sde,
    nonneg_int,
    out_path,
    positive_float,
    positive_int,
    unit_float,
    write_json,
    writing,
)
from ._processes import add_process_options, init_processes

#: `probflow train`'s values for the options that a `--preset` may set instead.
TRAIN_DEFAULTS = {
    "batch_size": 64,
    "lr": 5e-4,
    "warmup": 200,
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "checkpoint_every": 1000,
}


def _or_preset(what: str) -> str:
    return f"(default: {TRAIN_DEFAULTS[what]}, or the --preset's value)"


def _add_train(p) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True,
                   help="the run directory (must not exist, or be empty, unless --resume)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint up to --train-steps")
    g.add_argument("--preset", "--config", dest="preset", default=None, metavar="NAME",
                   help="a training preset (--config: its old name), one of the paper's: "
                        "ddpmpp-cifar10, ddpmpp-deep-cifar10, "
                        "subvp-ddpmpp-cifar10, ncsnpp-cifar10, ncsnpp-deep-cifar10 (network, "
                        "SDE, data and hyperparameters, docs/scaling.md); options given "
                        "explicitly override it (default: none)")
    g.add_argument("--data", default=None,
                   help="a dataset name that probflow.data.load knows (default: the --preset's; "
                        "required without --preset)")
    g.add_argument("--data-dir", default=None,
                   help="directory of prepared tensorflow-datasets data, for tfds:NAME "
                        "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    g.add_argument("--validation", type=nonneg_int, default=0, metavar="N",
                   help="hold out N training images (train on the rest)")
    g.add_argument("--sde", choices=SDE_NAMES, default=None,
                   help="the forward SDE (default: the --preset's; required without --preset)")
    g.add_argument("--train-steps", "--steps", dest="steps", type=positive_int, default=None,
                   metavar="N",
                   help="total optimiser steps (default: the --preset's; required without "
                        "--preset)")
    g.add_argument("--seed", type=nonneg_int, default=0,
                   help="seeds the initial weights and every step's batch, noise and times")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="write the checkpoint every N steps " + _or_preset("checkpoint_every"))
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("network (without --preset)")
    g.add_argument("--model", choices=["unet", "mlp"], default="unet", help="the score network")
    g.add_argument("--channels", default="32,64", help="U-Net channels per resolution level")
    g.add_argument("--num-res-blocks", type=positive_int, default=1,
                   help="U-Net residual blocks per level")
    g.add_argument("--width", type=positive_int, default=256, help="MLP width")
    g.add_argument("--depth", type=positive_int, default=3, help="MLP residual layers")

    g = p.add_argument_group("optimiser")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="examples per step " + _or_preset("batch_size"))
    g.add_argument("--lr", type=positive_float, default=None,
                   help="Adam's learning rate after warm-up " + _or_preset("lr"))
    g.add_argument("--warmup", type=nonneg_int, default=None, metavar="N",
                   help="linear learning-rate warm-up steps " + _or_preset("warmup"))
    g.add_argument("--grad-clip", type=positive_float, default=None,
                   help="global-norm gradient clipping " + _or_preset("grad_clip"))
    g.add_argument("--ema-decay", type=unit_float, default=None,
                   help="decay of the weights' EMA (the saved model) " + _or_preset("ema_decay"))
    g.add_argument("--likelihood-weighting", action="store_true",
                   help="lambda(t) = g(t)^2 instead of std(t)^2 (eq. 7)")
    g.add_argument("--no-importance-sampling", action="store_true",
                   help="with --likelihood-weighting, draw t uniformly instead of with density "
                        "~ g^2/std^2")
    g.add_argument("--steps-per-call", type=positive_int, default=None, metavar="N",
                   help="optimiser steps per jitted call (default: 1 for a U-Net, 50 for an "
                        "MLP, or the --preset's value)")

    g = p.add_argument_group("devices")
    g.add_argument("--devices", type=positive_int, default=None, metavar="N",
                   help="train data-parallel on N devices (default: one device)")
    add_process_options(p)


def _build_network(args, ds, sde, key):
    from ..models import MLP, UNet

    if args.model == "mlp":
        return MLP(ds.shape, sde=sde, width=args.width, depth=args.depth, key=key)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise CLIError(f"--channels: expected integers like 32,64, got {args.channels!r}") from None
    return UNet(ds.shape, sde=sde, channels=channels, num_res_blocks=args.num_res_blocks, key=key)


def _required(preset):
    """The preset, when the options checked above say there is one."""
    assert preset is not None
    return preset


def _train_config(args, paper):
    """The TrainConfig: explicit options, else the preset's values, else the defaults."""
    from .._train import TrainConfig

    base = paper.train if paper is not None else None

    def pick(field):
        explicit = getattr(args, field)
        if explicit is not None:
            return explicit
        return getattr(base, field) if base is not None else TRAIN_DEFAULTS[field]

    spc = args.steps_per_call
    if spc is None:
        spc = base.steps_per_call if base is not None else (1 if args.model == "unet" else 50)
    fields: dict[str, Any] = dict(
        steps=args.steps if args.steps is not None else _required(base).steps,
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        warmup=pick("warmup"),
        grad_clip=pick("grad_clip"),
        ema_decay=pick("ema_decay"),
        checkpoint_every=pick("checkpoint_every"),
        steps_per_call=spc,
        seed=args.seed,
    )
    if base is not None:
        return dataclasses.replace(base, **fields)
    return TrainConfig(
        **fields,
        weighting="likelihood" if args.likelihood_weighting else "default",
        importance_sampling=args.likelihood_weighting and not args.no_importance_sampling,
    )


def _run_train(args) -> int:
    import jax

    from .._train import train

    if args.process_id in (None, 0):  # the process that writes the run
        out_path(args.out, None, folder=True, create=False)
    _signals.stop_at_safe_point()  # SIGTERM: checkpoint, then exit (a preempted job resumes)
    init_processes(args)
    if args.devices is None and jax.process_count() > 1:
        args.devices = jax.device_count()  # every device of every process
    if args.devices is not None:
        from .._distributed import select_devices

        try:
            select_devices(args.devices)
        except ValueError as e:
            raise CLIError(f"--devices: {e}") from None
    paper = None
    if args.preset is not None:
        from .._train_presets import train_preset

        try:
            paper = train_preset(args.preset)
        except ValueError as e:
            raise CLIError(f"--preset: {e}") from None
        if args.sde is not None and args.sde != paper.sde:
            raise CLIError(f"--sde {args.sde} contradicts --preset {paper.name} (an "
                           f"{paper.sde} model); drop --sde")
    else:
        for option, value in (("--data", args.data), ("--sde", args.sde),
                              ("--train-steps", args.steps)):
            if value is None:
                raise CLIError(f"{option} is required (unless --preset NAME gives it)")
    run = Path(args.out)
    if args.resume and not ((run / "checkpoint.eqx").exists() or (run / "config.json").exists()):
        raise CLIError(f"--resume: no checkpoint in {args.out} to resume from")
    config = _train_config(args, paper)
    data_name = args.data or _required(paper).data
    ds = load_data(data_name, "train", data_dir=args.data_dir)
    if args.validation:
        try:
            ds, _ = ds.hold_out(args.validation, seed=0)
        except ValueError as e:
            raise CLIError(f"--validation {args.validation}: {e} (the data has {len(ds)})"
                           ) from None
    key = jax.random.key(args.seed)
    if paper is not None:
        if tuple(ds.shape) != paper.shape:
            raise CLIError(f"--data {data_name}: examples have shape {tuple(ds.shape)}, but "
                           f"--preset {paper.name} is for {paper.shape}")
        sde = paper.make_sde()
        model = paper.make_model(key=key, sde=sde)
    else:
        sde = make_sde(_required(args.sde))
        model = _build_network(args, ds, sde, key)
    t0 = time.perf_counter()
    result = train(model, sde, ds, config, out=args.out, resume=args.resume,
                   progress=not args.no_progress, data_name=data_name, devices=args.devices)
    elapsed = time.perf_counter() - t0
    tail = result.losses[-100:]
    rows = [["run", str(args.out)]]
    if paper is not None:
        from .._train_presets import parameter_count

        rows += [["preset", paper.name], ["parameters", parameter_count(model)]]
    rows += [
        ["steps", result.step],
        ["final loss (mean of last 100)", float(tail.mean()) if len(tail) else None],
        ["wall time (s)", round(elapsed, 1)],
        ["checkpoint", str(Path(args.out) / "checkpoint.eqx")],
    ]
    if jax.process_index() == 0:  # in a multi-process run only process 0 reports
        print(format_table(["field", "value"], rows))
    return 0


# ------------------------------------------------------------------------ train-classifier


def _add_train_classifier(p) -> None:
    p.add_argument("--data", default="digits",
                   help="a labelled dataset name that probflow.data.load knows")
    p.add_argument("--sde", choices=("none",) + SDE_NAMES, default="vp",
                   help="train on x_t of this SDE at random t (noise-conditional), or 'none' "
                        "for clean data")
    p.add_argument("--train-steps", "--steps", dest="steps", type=positive_int, default=10000,
                   metavar="N", help="optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="the learning rate")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the weights and batches")
    add_output_options(p, out=None, suffix=".eqx", required=True,
                       out_help="the classifier file to write (.eqx)")


def _run_train_classifier(args) -> int:
    import jax
    import jax.numpy as jnp

    import probflow as pf

    out = out_path(args.out, ".eqx")
    out_path(args.json, None, "--json")
    train = load_data(args.data, "train")
    test = load_data(args.data, "test")
    sde = None if args.sde == "none" else make_sde(args.sde)
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
    with writing("--out", out):
        pf.save_classifier(out, clf, {"data": args.data, "sde": args.sde,
                                      "test_accuracy": acc})
    print(format_table(["data", "sde", "steps", "test acc", "time (s)", "out"],
                       [[args.data, args.sde, args.steps, f"{acc:.3f}", round(elapsed, 1),
                         str(out)]]))
    write_json(args.json, {"data": args.data, "sde": args.sde, "test_accuracy": acc,
                           "out": str(out)})
    return 0


COMMANDS = (
    Command(
        name="train",
        help="train a score model by denoising score matching",
        description="Train a score model (DSM, eq. 7) with Adam, warm-up, clipping and an EMA; "
                    "the run directory --out holds config.json, log.jsonl and checkpoint.eqx "
                    "(rewritten atomically every --checkpoint-every steps); --resume continues "
                    "it with the same result as an uninterrupted run.",
        add_arguments=_add_train,
        run=_run_train,
    ),
    Command(
        name="train-classifier",
        help="train a (noise-conditional) classifier",
        description="Train a classifier on a labelled dataset: clean data, or, with --sde, "
                    "noisy x_t at random t for class-conditional sampling (eq. 14).",
        add_arguments=_add_train_classifier,
        run=_run_train_classifier,
    ),
)
