"""Training presets: the paper's CIFAR-10 training configurations (Song et al. 2021, appendix H),
data only, used by `probflow train --preset NAME` (the runner is in `probflow/_cli/_training.py`).
The paper's *evaluation* configs (for its released checkpoints) are `_score_sde_configs.py`.

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
from ._train_config import TrainConfig
from .models import DDPMpp

#: The presets' short SDE names (also `probflow train --sde`), the one map from them.
_SDE_BY_NAME: dict[str, type[AbstractSDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def sde_from_name(name: str) -> AbstractSDE:
    """The SDE of a short name, "vp", "subvp" or "ve", with the paper's parameters."""
    try:
        return _SDE_BY_NAME[name]()
    except KeyError:
        raise ValueError(
            f"unknown SDE {name!r}; expected one of {', '.join(_SDE_BY_NAME)}"
        ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainPreset:
    """A named training preset: network, SDE, data and training hyperparameters."""

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
        if self.sde not in _SDE_BY_NAME:
            raise ValueError(f"sde must be 'vp', 'subvp' or 've', got {self.sde!r}")
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {type(self.train).__name__}")

    def make_sde(self) -> AbstractSDE:
        return sde_from_name(self.sde)

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


TRAIN_PRESETS: dict[str, TrainPreset] = {
    c.name: c
    for c in [
        TrainPreset(name="ddpmpp-cifar10", description="DDPM++ cont. (VP), CIFAR-10",
                    network="ddpmpp", deep=False, sde="vp", train=_train_config(0.9999)),
        TrainPreset(name="ddpmpp-deep-cifar10", description="DDPM++ cont. deep (VP), CIFAR-10",
                    network="ddpmpp", deep=True, sde="vp", train=_train_config(0.9999)),
        TrainPreset(name="subvp-ddpmpp-cifar10",
                    description="DDPM++ cont. (sub-VP), CIFAR-10",
                    network="ddpmpp", deep=False, sde="subvp", train=_train_config(0.9999)),
        TrainPreset(name="ncsnpp-cifar10", description="NCSN++ cont. (VE), CIFAR-10",
                    network="ncsnpp", deep=False, sde="ve", train=_train_config(0.999)),
        TrainPreset(name="ncsnpp-deep-cifar10", description="NCSN++ cont. deep (VE), CIFAR-10",
                    network="ncsnpp", deep=True, sde="ve", train=_train_config(0.999)),
    ]
}


def train_preset(name: str) -> TrainPreset:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; known: {', '.join(TRAIN_PRESETS)}"
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
