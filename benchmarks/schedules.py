"""Fixed-step schedules: decode error vs a tight adaptive reference from the same latents.

    python benchmarks/schedules.py [--n 8]

digits-vp (shipped U-Net) and a 2-d Gaussian mixture under VP; solver error = RMS over examples
of |x_fixed - x_ref| (per-example L2 norm divided by sqrt(D)).
"""

import argparse

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import probflow as pf

SCHEDULES = {
    "uniform t": pf.UniformSchedule(pf.LinearTime()),
    "uniform sqrt(t)": pf.UniformSchedule(pf.SqrtTime()),
    "uniform log-SNR": pf.UniformSchedule(pf.LogSNRTime()),
    "EDM rho=7": pf.EDMSchedule(),
}
SOLVERS = [
    ("Euler", diffrax.Euler(), 10), ("Heun", diffrax.Heun(), 5), ("Heun", diffrax.Heun(), 10)
]


def run(name, model, sde, z, ref_solver):
    ref = pf.decode(model, sde, z, solver=ref_solver, rtol=1e-6, atol=1e-6).x
    d = np.prod(z.shape[1:])
    for sname, solver, steps in SOLVERS:
        row = []
        for sch in SCHEDULES.values():
            r = pf.decode(model, sde, z, solver=solver, steps=steps, schedule=sch)
            err = jnp.sqrt(jnp.sum((r.x - ref).reshape(len(z), -1) ** 2, 1) / d)
            row.append(f"{float(jnp.mean(err)):.4f}")
        nfe = int(r.nfe[0])
        print(f"| {name} | {sname} {steps} | {nfe} | " + " | ".join(row) + " |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8)
    a = p.parse_args()
    print("| data | solver, steps | NFE | " + " | ".join(SCHEDULES) + " |")
    print("|---|---|---|" + "---|" * len(SCHEDULES))
    sde = pf.VPSDE()
    mix = pf.GaussianMixture(
        [0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]], [np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]]
    )
    z = jax.random.normal(jax.random.key(1), (256, 2))
    run("mixture (VP)", mix.score_model(sde), sde, z, diffrax.Dopri8())
    model, sde = pf.load_pretrained("digits-vp")
    shape = model.shape
    z = jax.vmap(lambda k: sde.prior_sample(k, shape, jnp.float32))(
        jax.random.split(jax.random.key(0), a.n)
    )
    run("digits-vp", model, sde, z, diffrax.Tsit5())


if __name__ == "__main__":
    main()
