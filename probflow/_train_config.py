"""The hyperparameters of a training run: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _check_int(name, value, minimum):
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name, value, *, low, low_open=True, high=None):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of one training run (the run is a function of these and the model)."""

    steps: int = 20_000  # total optimiser steps
    batch_size: int = 128
    lr: float = 2e-4  # Adam's learning rate after warm-up
    warmup: int = 500  # linear warm-up: step k (from 0) uses lr * min(1, (k + 1) / warmup)
    grad_clip: float = 1.0  # global-norm gradient clipping
    ema_decay: float = 0.999  # EMA of the weights (evaluation and saved models use it)
    seed: int = 0
    weighting: str = "default"  # "default" (std^2) or "likelihood" (g^2)
    importance_sampling: bool = False  # t ~ g^2/std^2 (likelihood weighting only)
    eps: float = 1e-5  # t ~ U[eps, T]
    dequantize: bool = True  # uniform dequantization of integer data
    steps_per_call: int = 50  # optimiser steps per jitted call (lax.scan)
    checkpoint_every: int = 1_000
    log_every: int = 100  # steps between JSON-lines log records (and progress-bar updates)

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_float("lr", self.lr, low=0.0)
        _check_int("warmup", self.warmup, 0)
        _check_float("grad_clip", self.grad_clip, low=0.0)
        _check_float("ema_decay", self.ema_decay, low=0.0, low_open=False, high=1.0)
        _check_int("seed", self.seed, 0)
        if self.weighting not in ("default", "likelihood"):
            raise ValueError(f"weighting must be 'default' or 'likelihood', got {self.weighting!r}")
        if self.importance_sampling and self.weighting != "likelihood":
            raise ValueError("importance_sampling=True needs weighting='likelihood'")
        _check_float("eps", self.eps, low=0.0, high=1.0)
        _check_int("steps_per_call", self.steps_per_call, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("log_every", self.log_every, 1)

    def next_stop(self, step: int) -> int:
        """The end of the chunk that starts at `step`: the next multiple of `steps_per_call` or
        of `checkpoint_every`, or `steps`, whichever comes first."""
        return min(
            self.steps,
            (step // self.steps_per_call + 1) * self.steps_per_call,
            (step // self.checkpoint_every + 1) * self.checkpoint_every,
        )

    def is_checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps
