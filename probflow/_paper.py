"""The paper's CIFAR-10 configurations (Song et al. 2021, appendix H), as named configs of
`probflow train --config NAME`.

| name                  | network            | SDE   | res blocks | EMA    |
|-----------------------|--------------------|-------|------------|--------|
| ddpmpp-cifar10        | DDPM++ cont.       | VP    | 4          | 0.9999 |
| ddpmpp-deep-cifar10   | DDPM++ cont. deep  | VP    | 8          | 0.9999 |
| subvp-ddpmpp-cifar10  | DDPM++ cont.       | subVP | 4          | 0.9999 |
| ncsnpp-cifar10        | NCSN++ cont.       | VE    | 4          | 0.999  |
| ncsnpp-deep-cifar10   | NCSN++ cont. deep  | VE    | 8          | 0.999  |

All: 128 channels, channel multipliers (1, 2, 2, 2), attention at 16x16, dropout 0.1, Adam
2e-4 with 5,000 linear warm-up steps, gradient clipping at norm 1, batch 128, 1.3M steps, data
`tfds:cifar10` (prepared locally, docs/data.md).
"""

from __future__ import annotations

import dataclasses

import jax

from ._sde import VESDE, VPSDE, AbstractSDE, SubVPSDE
from ._train import TrainConfig
from .models import DDPMpp


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperConfig:
    """A named configuration: network, SDE, data and training hyperparameters."""

    name: str
    description: str
    network: str  # "ddpmpp" or "ncsnpp"
    deep: bool
    sde: str  # "vp", "subvp" or "ve"
    data: str = "tfds:cifar10"
    shape: tuple[int, int, int] = (32, 32, 3)
    train: TrainConfig

    def __post_init__(self):
        if self.network not in ("ddpmpp", "ncsnpp"):
            raise ValueError(f"network must be 'ddpmpp' or 'ncsnpp', got {self.network!r}")
        if self.sde not in ("vp", "subvp", "ve"):
            raise ValueError(f"sde must be 'vp', 'subvp' or 've', got {self.sde!r}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(self.train).__name__}")

    def make_sde(self) -> AbstractSDE:
        return {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}[self.sde]()

    def make_model(self, *, key, shape=None, sde: AbstractSDE | None = None, **overrides):
        """The network (`overrides` change its hyperparameters, e.g. nf=32 for a smoke test)."""
        build = DDPMpp.ddpmpp if self.network == "ddpmpp" else DDPMpp.ncsnpp
        sde = self.make_sde() if sde is None else sde
        return build(self.shape if shape is None else shape, sde=sde, deep=self.deep, key=key,
                     **overrides)


def _train_config(ema_decay: float) -> TrainConfig:
    return TrainConfig(
        steps=1_300_000,
        batch_size=128,
        lr=2e-4,
        warmup=5_000,
        grad_clip=1.0,
        ema_decay=ema_decay,
        steps_per_call=1,
        checkpoint_every=10_000,
        log_every=100,
    )


PAPER_CONFIGS: dict[str, PaperConfig] = {
    c.name: c
    for c in [
        PaperConfig(name="ddpmpp-cifar10", description="DDPM++ cont. (VP), CIFAR-10",
                    network="ddpmpp", deep=False, sde="vp", train=_train_config(0.9999)),
        PaperConfig(name="ddpmpp-deep-cifar10", description="DDPM++ cont. deep (VP), CIFAR-10",
                    network="ddpmpp", deep=True, sde="vp", train=_train_config(0.9999)),
        PaperConfig(name="subvp-ddpmpp-cifar10",
                    description="DDPM++ cont. (sub-VP), CIFAR-10",
                    network="ddpmpp", deep=False, sde="subvp", train=_train_config(0.9999)),
        PaperConfig(name="ncsnpp-cifar10", description="NCSN++ cont. (VE), CIFAR-10",
                    network="ncsnpp", deep=False, sde="ve", train=_train_config(0.999)),
        PaperConfig(name="ncsnpp-deep-cifar10", description="NCSN++ cont. deep (VE), CIFAR-10",
                    network="ncsnpp", deep=True, sde="ve", train=_train_config(0.999)),
    ]
}


def paper_config(name: str) -> PaperConfig:
    try:
        return PAPER_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown config {name!r}; known: {', '.join(PAPER_CONFIGS)}"
        ) from None


def parameter_count(model) -> int:
    """The number of network parameters (float array leaves, the SDE's excepted) of a score
    model or of its `jax.eval_shape`."""
    import numpy as np

    parts = [getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "sde"]
    return sum(
        int(np.prod(x.shape))
        for x in jax.tree.leaves(parts)
        if hasattr(x, "dtype") and hasattr(x, "shape") and np.issubdtype(x.dtype, np.inexact)
    )


#: Fields of `probflow train` that a config sets, with the option that overrides each.
CLI_OVERRIDES = {
    "batch_size": "--batch-size",
    "lr": "--lr",
    "warmup": "--warmup",
    "grad_clip": "--grad-clip",
    "ema_decay": "--ema-decay",
    "steps_per_call": "--steps-per-call",
}


def run_config(args) -> int:
    """`probflow train --config NAME`: the config's network, SDE, data and hyperparameters;
    --data, --sde, --steps and the options in `CLI_OVERRIDES`, when given, override them."""
    import time
    from pathlib import Path

    from ._cli import CLIError, build_parser, format_table, load_data
    from ._train import train

    try:
        cfg = paper_config(args.config)
    except ValueError as e:
        raise CLIError(f"--config: {e}") from None
    if args.sde is not None and args.sde != cfg.sde:
        raise CLIError(
            f"--sde {args.sde} contradicts --config {cfg.name} (an {cfg.sde} model); drop --sde"
        )
    if args.resume and not (Path(args.out) / "checkpoint.eqx").exists():
        raise CLIError(f"--resume: no checkpoint in {args.out} to resume from")
    defaults = vars(build_parser().parse_args(["train", "--config", cfg.name, "--out", "-"]))
    overrides = {
        field: getattr(args, field)
        for field in CLI_OVERRIDES
        if getattr(args, field) is not None and getattr(args, field) != defaults[field]
    }
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.checkpoint_every != defaults["checkpoint_every"]:
        overrides["checkpoint_every"] = args.checkpoint_every
    overrides["seed"] = args.seed
    config = dataclasses.replace(cfg.train, **overrides)
    data_name = args.data or cfg.data
    ds = load_data(data_name, "train", data_dir=args.data_dir)
    if tuple(ds.shape) != cfg.shape:
        raise CLIError(
            f"--data {data_name}: examples have shape {tuple(ds.shape)}, but --config "
            f"{cfg.name} is for {cfg.shape}"
        )
    sde = cfg.make_sde()
    model = cfg.make_model(key=jax.random.key(args.seed), sde=sde)
    t0 = time.perf_counter()
    result = train(
        model, sde, ds, config, out=args.out, resume=args.resume,
        progress=not args.no_progress, data_name=data_name, devices=args.devices,
    )
    elapsed = time.perf_counter() - t0
    tail = result.losses[-100:]
    rows = [
        ["run", str(args.out)],
        ["config", cfg.name],
        ["parameters", parameter_count(model)],
        ["steps", result.step],
        ["final loss (mean of last 100)", float(tail.mean()) if len(tail) else float("nan")],
        ["wall time (s)", round(elapsed, 1)],
        ["checkpoint", str(Path(args.out) / "checkpoint.eqx")],
    ]
    print(format_table(["field", "value"], rows))
    return 0
