"""Score models shipped inside the package (trained by scripts/train_digits.py)."""

from __future__ import annotations

from pathlib import Path

from ._checkpoint import CheckpointError, load_checkpoint

_DIR = Path(__file__).parent / "pretrained"

#: The shipped models' names; each is `probflow/pretrained/NAME.eqx`.
PRETRAINED_NAMES = ("digits-vp", "digits-subvp", "digits-color-vp")


def pretrained_path(name: str) -> Path:
    """The file of the shipped model `name`."""
    if name not in PRETRAINED_NAMES:
        raise ValueError(
            f"unknown pretrained model {name!r}; shipped models: {', '.join(PRETRAINED_NAMES)}"
        )
    path = _DIR / f"{name}.eqx"
    if not path.exists():
        raise CheckpointError(f"pretrained model {name!r} is missing from the package: {path}")
    return path


def load_pretrained(name: str):
    """`(model, sde)` of a shipped model: "digits-vp", "digits-subvp", or "digits-color-vp" (a
    colour model of the tinted digits "digits-color", for colorization).

    They are U-Nets on 8x8 digits in model space (0, 1) with 17 bins, so that
    `pf.bits_per_dim(model, sde, x_int, key=key, num_bins=17)` evaluates them. Their weights are
    stored in float32; with `jax_enable_x64` on they load as float64 (an exact cast), so that the
    whole network then runs in float64.

    **Arguments:**

    - `name`: "digits-vp", "digits-subvp" or "digits-color-vp".
    """
    model, sde, _ = load_checkpoint(pretrained_path(name))
    return model, sde
