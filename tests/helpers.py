"""Shared test helpers (tests/ is on sys.path under pytest's default rootdir-based imports)."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax

_COUNT = [0]


def _bump():
    _COUNT[0] += 1


class Counting(eqx.Module):
    """A score model that bumps a host-side counter on every evaluation.

    The callback takes no batched argument, so under `jax.vmap` it fires once per evaluation of
    the whole batch: count single examples (batch size 1), or compare a batch example by example
    with its solo solves (vmapped solves run in lock-step until the slowest example finishes).
    """

    model: Callable

    def __call__(self, t, x):
        jax.debug.callback(_bump)
        return self.model(t, x)


def reset_count() -> None:
    _COUNT[0] = 0


def count() -> int:
    """Evaluations since the last `reset_count` (after every pending callback has run)."""
    jax.effects_barrier()
    return _COUNT[0]


def host_count(fn: Callable, *args, **kwargs):
    """(host-side evaluations, result) of `fn(*args, **kwargs)`, one solve of a `Counting` model."""
    reset_count()
    r = jax.block_until_ready(fn(*args, **kwargs))
    return count(), r


# ------------------------------------------------------- the paper's checkpoints (fixtures)

SCORE_SDE_DATA = __import__("pathlib").Path(__file__).parent / "data" / "score_sde"


def score_sde_fixtures() -> dict:
    """tests/data/score_sde/manifest.json's fixtures (scripts/make_score_sde_fixtures.py)."""
    import json

    return json.loads((SCORE_SDE_DATA / "manifest.json").read_text())["fixtures"]


def score_sde_fixture_config(fid: str) -> dict:
    """A fixture's config: the named paper config with the fixture's (small) overrides."""
    import probflow as pf

    f = score_sde_fixtures()[fid]
    cfg = pf.score_sde_config(f["base"])
    cfg["model"].update(f["model"])
    cfg["data"].update(f["data"])
    return cfg
