"""Time to load a shipped model: shape-only skeleton (today's `pf.load_pretrained`) vs the eager
skeleton it replaced (a randomly initialised UNet built op by op, then overwritten), side by side.

Each variant runs in a fresh Python process (so neither profits from the other's compilations)
and is timed from just after `import probflow` to a model whose output on a fixed input is ready.

Run:  python benchmarks/load_speed.py [--name digits-vp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, io
import jax, jax.numpy as jnp, equinox as eqx
import probflow as pf
from probflow._checkpoint import read_checkpoint, _tuples, _load_leaf, deserialise_sde
from probflow.models import UNet
name, variant = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if variant == "shape-only":
    model, sde = pf.load_pretrained(name)
else:  # the eager skeleton of probflow before issue 12
    header, payload, _ = read_checkpoint(pf._pretrained.pretrained_path(name))
    sde = deserialise_sde(header["sde"])
    like = UNet(**_tuples(header["model"]["hyperparameters"]), sde=sde, key=jax.random.key(0))
    model = eqx.tree_deserialise_leaves(io.BytesIO(payload), like, filter_spec=_load_leaf)
t_load = time.perf_counter() - t0
out = eqx.filter_jit(lambda m, x: m(0.5, x))(model, jnp.full(model.shape, 0.3))
out.block_until_ready()
print(t_load, float(jnp.sum(out)))
"""


def run(name: str, variant: str) -> tuple[float, float]:
    res = subprocess.run([sys.executable, "-c", CHILD, name, variant], check=True,
                         capture_output=True, text=True)
    t, checksum = res.stdout.split()
    return float(t), float(checksum)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="digits-vp")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = {"eager": [], "shape-only": []}
    sums = {}
    for _ in range(args.repeats):
        for variant in times:
            t, s = run(args.name, variant)
            times[variant].append(t)
            sums[variant] = s
    assert sums["eager"] == sums["shape-only"], sums  # the same model either way
    eager, fast = (statistics.median(times[v]) for v in ("eager", "shape-only"))
    print(f"load_pretrained({args.name!r}), median of {args.repeats} fresh processes")
    print(f"{'eager skeleton (before)':>26}: {eager:7.3f} s")
    print(f"{'shape-only skeleton (now)':>26}: {fast:7.3f} s   ({eager / fast:.1f}x faster)")


if __name__ == "__main__":
    main()
