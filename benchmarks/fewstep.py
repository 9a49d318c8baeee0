"""Few-step sampling on digits-vp: every solver x schedule, tuned schedules included.

    python benchmarks/fewstep.py [--nfe 4,5,6,8,10,15,20] [--tune-nfe 5,10]
                                 [--tune-solver-nfe 5,10] [--json PATH]
                                 [--plot docs/img/fewstep.png]
    python benchmarks/fewstep.py --from-json a.json,b.json [--plot PATH]   # merge, table, plot

Solver error: RMS over the 64 held-out prior latents and all pixels of the decode's difference,
in model space, from a Tsit5 solve at rtol = atol = 1e-7 from the same latents. Frechet distance:
pf.frechet_distance between the shipped digits classifier's features of the (clipped) decodes and
of the digits test split. Tuned schedules are tuned (pf.tune_schedule, default options) on 32
other prior latents, one per solver and step count in --tune-nfe. A setting whose NFE is not a
multiple of the solver's evaluations per step is skipped. Tuned solvers (pf.tune_solver,
default options: 64 other prior latents) are tuned at each NFE in --tune-solver-nfe and reported
with their tuning time (compilation and reference solve included).

"""

import argparse
import json
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import probflow as pf

# (label, solver, score evaluations per step).
SOLVERS = [
    ("DPM-Solver++(2M)", pf.DPMSolverMultistep(order=2), 1),
    ("DPM-Solver++(3M)", pf.DPMSolverMultistep(order=3), 1),
    ("UniPC-3 bh1", pf.UniPC(order=3), 1),
    ("UniPC-3 bh2", pf.UniPC(order=3, variant="bh2"), 1),
    ("DEIS-tAB3", pf.DEIS(order=3), 1),
    ("iPNDM", pf.IPNDM(), 1),
    ("DPM-Solver-2", pf.DPMSolver(order=2), 2),
    ("Heun", diffrax.Heun(), 2),
]
SCHEDULES = {
    "sqrt(t)": pf.UniformSchedule(pf.SqrtTime()),
    "log-SNR": pf.UniformSchedule(pf.LogSNRTime()),
    "EDM rho=7": pf.EDMSchedule(),
}
BASELINE = ("DPM-Solver++(2M)", "sqrt(t)")  # the default: DPM-Solver++(2M), uniform in sqrt(t)


def ints(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nfe", type=ints, default=(4, 5, 6, 8, 10, 15, 20))
    p.add_argument("--tune-nfe", type=ints, default=(5, 10),
                   help="the NFE at which schedules are tuned (each takes minutes here)")
    p.add_argument("--tune-solvers", default="DPM-Solver++(2M),DPM-Solver++(3M)")
    p.add_argument("--tune-solver-nfe", type=ints, default=(5, 10),
                   help="the NFE at which pf.tune_solver is run (empty: none)")
    p.add_argument("--solvers", default=None, help="comma-separated labels (default: all)")
    p.add_argument("--schedules", default=None, help="comma-separated names (default: all)")
    p.add_argument("--num-latents", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from-json", default=None,
                   help="comma-separated --json files of earlier runs: print their rows as one "
                        "markdown table (and --plot them) instead of measuring")
    a = p.parse_args()
    if a.from_json:
        rows = []
        for path in a.from_json.split(","):
            with open(path) as f:
                got = json.load(f)
            rows += got if not rows else [r for r in got if r["schedule"] != "adaptive"]
        print(markdown(rows))
        if a.plot:
            plot(rows, a.plot)
        return

    model, sde = pf.load_pretrained("digits-vp")
    shape = model.shape
    keys = jax.random.split(jax.random.key(2024), a.num_latents)
    z = jax.vmap(lambda k: sde.prior_sample(k, shape, jnp.float32))(keys)
    start = time.perf_counter()
    ref = pf.decode(model, sde, z, solver=diffrax.Tsit5(), rtol=1e-7, atol=1e-7)
    print(f"reference: Tsit5 at 1e-7, mean NFE {float(ref.nfe.mean()):.0f}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    clf = pf.load_pretrained_classifier("digits-classifier")
    ds = pf.data.load("digits", split="test")
    data = np.asarray(ds.to_model_space(), np.float32)
    feats = jax.jit(jax.vmap(lambda xi: clf.features(0.0, xi)))
    data_feats = feats(data)
    lo, hi = ds.data_range

    def measure(x):
        err = float(jnp.sqrt(jnp.mean((x - ref.x) ** 2)))
        fd = pf.frechet_distance(feats(jnp.clip(x, lo, hi)), data_feats)
        return err, fd

    rows = [dict(solver="Tsit5 1e-7 (reference)", schedule="adaptive",
                 nfe=float(ref.nfe.mean()), error=0.0, frechet=measure(ref.x)[1])]
    print(f"reference Frechet {rows[0]['frechet']:.4g}", flush=True)
    tune_solvers = set(a.tune_solvers.split(","))
    solvers = [s for s in SOLVERS if a.solvers is None or s[0] in a.solvers.split(",")]
    named = {k: v for k, v in SCHEDULES.items()
             if a.schedules is None or k in a.schedules.split(",")}
    for label, solver, per_step in solvers:
        for nfe in a.nfe:
            if nfe % per_step:
                continue
            steps = nfe // per_step
            if steps < 1 or (isinstance(solver, pf.DPMSolverMultistep) and steps < 2):
                continue
            scheds = dict(named)
            if label in tune_solvers and nfe in a.tune_nfe and steps >= 2:
                t = time.perf_counter()
                scheds["tuned"] = pf.tune_schedule(model, sde, solver, steps,
                                                   key=jax.random.key(7))
                print(f"  tuned {label} steps={steps} in {time.perf_counter() - t:.0f} s "
                      f"(incl. compile and reference): {scheds['tuned'].ts}", flush=True)
            for sname, sched in scheds.items():
                r = pf.decode(model, sde, z, solver=solver, steps=steps, schedule=sched)
                err, fd = measure(r.x)
                rows.append(dict(solver=label, schedule=sname, nfe=int(r.nfe[0]), error=err,
                                 frechet=fd))
                print(f"{label:18s} {sname:10s} NFE {int(r.nfe[0]):3d}  error {err:.5f}  "
                      f"Frechet {fd:.4g}", flush=True)
    for nfe in a.tune_solver_nfe:
        t = time.perf_counter()
        tuned = pf.tune_solver(model, sde, nfe, key=jax.random.key(7))
        wall = time.perf_counter() - t
        r = pf.decode(model, sde, z, solver=tuned, steps=nfe)
        err, fd = measure(r.x)
        rows.append(dict(solver="TunedSolver", schedule="tuned", nfe=int(r.nfe[0]), error=err,
                         frechet=fd, tuning_seconds=wall))
        print(f"{'TunedSolver':18s} {'tuned':10s} NFE {int(r.nfe[0]):3d}  error {err:.5f}  "
              f"Frechet {fd:.4g}  (tuned in {wall:.0f} s)", flush=True)
    base = {r["nfe"]: r["error"] for r in rows
            if (r["solver"], r["schedule"]) == BASELINE}
    for nfe in (5, 10):
        cands = [r for r in rows if r["nfe"] == nfe and r["solver"] != rows[0]["solver"]]
        if cands and nfe in base:
            best = min(cands, key=lambda r: r["error"])
            print(f"NFE {nfe}: best {best['solver']} + {best['schedule']} {best['error']:.5f}, "
                  f"ratio to {BASELINE[0]} + {BASELINE[1]}: {best['error'] / base[nfe]:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.plot:
        plot(rows, a.plot)


def markdown(rows):
    """One row per solver and schedule, the RMS error and Frechet distance at each NFE."""
    base = {r["nfe"]: r["error"] for r in rows if (r["solver"], r["schedule"]) == BASELINE}
    nfes = sorted({r["nfe"] for r in rows[1:]})
    lines = ["| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    groups = {}
    for r in rows[1:]:
        groups.setdefault((r["solver"], r["schedule"]), {})[r["nfe"]] = r
    for (solver, sched), by_nfe in groups.items():
        cells = []
        for n in nfes:
            r = by_nfe.get(n)
            if r is None:
                cells.append("-")
                continue
            ratio = f" ({r['error'] / base[n]:.2f}x)" if n in base else ""
            cells.append(f"{r['error']:.4f}{ratio} / {r['frechet']:.1f}")
        lines.append(f"| {solver} | {sched} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = {}
    for r in rows[1:]:
        groups.setdefault((r["solver"], r["schedule"]), []).append(r)
    for (solver, sched), pts in groups.items():
        pts.sort(key=lambda r: r["nfe"])
        style = "o-" if sched == "tuned" else {"sqrt(t)": "s--", "log-SNR": "^:",
                                               "EDM rho=7": "v-."}[sched]
        for ax, key in zip(axes, ("error", "frechet")):
            ax.plot([r["nfe"] for r in pts], [r[key] for r in pts], style, ms=3,
                    label=f"{solver}, {sched}")
    for ax, name in zip(axes, ("RMS error vs Tsit5 at 1e-7", "Frechet distance")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].axhline(rows[0]["frechet"], color="k", lw=0.8, label="reference solve")
    axes[1].legend(fontsize=5, ncol=2)
    fig.suptitle("digits-vp, 64 held-out prior latents")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
