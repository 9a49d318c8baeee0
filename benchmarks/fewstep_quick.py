"""Quick few-step comparison on digits-vp: RMS decode error in model space of 64 prior latents
against a Tsit5 solve at rtol = atol = 1e-7 from the same latents, at 5 and 10 NFE, for the new
solvers (default schedules) and DPM-Solver++(2M) (default). EDM's sampler without churn
(Algorithm 1, 2N - 1 evaluations) at N = 3 and 5 (5 and 9 NFE).

Run: python benchmarks/fewstep_quick.py [--schedules]   (CPU, a few minutes)
"""

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp

import probflow as pf
from probflow._edm import solve_edm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", action="store_true",
                        help="also the edm and log_snr schedules")
    args = parser.parse_args()
    model, sde = pf.load_pretrained("digits-vp")
    z = sde.prior_sample(jax.random.key(2024), (64, 8, 8, 1), jnp.float32)
    t0 = time.time()
    ref = pf.decode(model, sde, z, solver=diffrax.Tsit5(), rtol=1e-7, atol=1e-7)
    took = time.time() - t0
    print(f"reference Tsit5 1e-7: mean nfe {float(jnp.mean(ref.nfe)):.0f} ({took:.0f} s)",
          flush=True)
    rms = lambda x: float(jnp.sqrt(jnp.mean((x - ref.x) ** 2)))  # noqa: E731
    solvers = [
        ("DPM-Solver++(2M)", pf.DPMSolverMultistep(2)),
        ("UniPC-3 bh1", pf.UniPC(3)),
        ("UniPC-2 bh1", pf.UniPC(2)),
        ("UniPC-3 bh2", pf.UniPC(3, variant="bh2")),
        ("iPNDM-4", pf.IPNDM(4)),
        ("DEIS-tAB3", pf.DEIS(3)),
    ]
    schedules = [None] + (["edm", "log_snr"] if args.schedules else [])
    for name, solver in solvers:
        for schedule in schedules:
            row = []
            for n in (5, 10):
                r = pf.decode(model, sde, z, solver=solver, steps=n, schedule=schedule)
                assert int(r.nfe[0]) == n
                row.append(rms(r.x))
            label = name + ("" if schedule is None else f" [{schedule}]")
            print(f"{label:28s} 5 NFE {row[0]:.4f}   10 NFE {row[1]:.4f}", flush=True)
    for n in (3, 5):
        s = pf.EDMStochasticSampler().bind(sde, n)
        ts = pf.EDMSchedule().times(sde, 1.0, 1e-3, n, jnp.float32)
        x, nfe, _, _ = jax.jit(jax.vmap(lambda zi, s=s, ts=ts: solve_edm(model, s, zi, ts,
                                                                      jax.random.key(0))))(z)
        print(f"EDM Heun (S_churn=0) N={n}      {int(nfe[0])} NFE {rms(x):.4f}", flush=True)


if __name__ == "__main__":
    main()
