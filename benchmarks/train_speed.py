"""Digits U-Net speed, channels-last (NHWC) vs channels-first (NCHW), measured in one run.

Prints training steps/s (one jitted step per call, batch 64, the shipped recipe) and the wall
time of one PF-ODE likelihood solve (`pf.log_likelihood`, Tsit5, rtol = atol = 1e-5, 16 images)
for each layout, and their ratios. Both layouts compute the same function (tests/test_models.py).
On CPU, XLA runs channels-first convolutions far slower inside a while loop (jax-ml/jax#12868),
which is what diffrax's adaptive solve is.

    python benchmarks/train_speed.py [--steps 30] [--images 16]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import probflow as pf
from probflow._train import TrainConfig, train
from probflow.models import UNet


def measure(layout, ds, steps, images):
    sde = pf.VPSDE()
    model = UNet(sde=sde, layout=layout, key=jax.random.key(0))
    cfg = TrainConfig(steps=steps, batch_size=64, steps_per_call=1, checkpoint_every=10**9,
                      log_every=10**9)
    train(model, sde, ds, TrainConfig(steps=2, batch_size=64, steps_per_call=1), progress=False)
    t0 = time.perf_counter()
    r = train(model, sde, ds, cfg, progress=False)  # includes one compile, amortised below
    train_s = time.perf_counter() - t0
    x = ds.to_model_space()[:images]
    ll = lambda: pf.log_likelihood(r.model, sde, x, key=jax.random.key(1), rtol=1e-5, atol=1e-5)
    out = ll()
    jax.block_until_ready(out.logp)
    t0 = time.perf_counter()
    out = ll()
    jax.block_until_ready(out.logp)
    solve_s = time.perf_counter() - t0
    return steps / train_s, solve_s, int(np.max(np.asarray(out.nfe)))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args()
    ds = pf.data.load("digits", "train")
    res = {layout: measure(layout, ds, args.steps, args.images) for layout in ("NHWC", "NCHW")}
    print(f"{'layout':>8} {'train steps/s':>14} {'PF-ODE solve (s)':>17} {'nfe':>6}")
    for layout, (sps, solve, nfe) in res.items():
        print(f"{layout:>8} {sps:14.2f} {solve:17.2f} {nfe:6d}")
    (a, sa, _), (b, sb, _) = res["NHWC"], res["NCHW"]
    print(f"channels-last / channels-first: training {a / b:.2f}x faster, "
          f"likelihood solve {sb / sa:.2f}x faster")


if __name__ == "__main__":
    main()
