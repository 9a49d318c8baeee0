"""The likelihood toolkit on the shipped digits models, one run: every method's bits/dim, its
standard error, the solver's estimated bias, NFE and wall time (docs/likelihood.md).

For each model (`--models`, default digits-vp and digits-subvp) on the first `--limit` test
digits (300 = all):

- ODE, uniform dequantization, K = 1 (`pf.bits_per_dim` at its defaults);
- ODE, truncated-normal dequantization (i-DODE), K = 1;
- ODE, uniform, importance-weighted K = 4 and 16: one run with `importance_samples=16`; K = 4 is
  the mean of its four disjoint groups of 4 draws (the same estimator, 4x the samples), its wall
  time 4/16 of the run's;
- the ELBO (`method="elbo"`, uniform dequantization, `--elbo-times` draws of t).

"std err" is the spread of the per-image values / sqrt(N) (images, dequantization, probes and the
ELBO's Monte Carlo noise included). "solver bias" is `pf.estimate_solver_bias` on `--check`
images (paired re-solves at 100x tighter tolerances, same draws), for the K = 1 ODE methods (the
ELBO solves nothing; the importance-weighted runs use the same solver as K = 1), and
"per-image solver error" the RMS of those paired differences. "time to ODE
se" is the wall time a method needs for the ODE (uniform, K = 1) standard error:
N_needed = (spread / se_ODE)^2 images at its measured seconds per image (compilation included).
`--figure` writes docs/img/likelihood-elbo-vs-ode.png (per-image ELBO against ODE bits/dim).

Run:  python benchmarks/likelihood_toolkit.py [--limit N] [--iw-limit N]
      [--models digits-vp,digits-subvp] [--check N] [--elbo-times N] [--figure] [--json PATH]
      (or one process per model with --json, then --from-json A.json,B.json --figure)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np
from scipy.special import logsumexp

import probflow as pf


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _iw(log_weights, k, d):
    """Per-image K-draw importance-weighted bits/dim, averaged over disjoint groups of K."""
    lw = np.asarray(log_weights, np.float64).mean(-1)  # [N, M] (one probe)
    n, m = lw.shape
    g = lw[:, : m // k * k].reshape(n, m // k, k)
    return -(np.asarray(logsumexp(g, axis=2)) - math.log(k)).mean(1) / (d * math.log(2))


def run_model(name, images, num_bins, args, key):
    model, sde = pf.load_pretrained(name)
    assert sde is not None
    d = int(np.prod(images.shape[1:]))
    n = images.shape[0]
    rows, per_image = [], {}
    common = dict(num_bins=num_bins)

    def add(method, bpd, nfe, wall, bias=None):
        bpd = np.asarray(bpd, np.float64)
        n = bpd.size
        rows.append(dict(model=name, method=method, bpd=float(bpd.mean()),
                         se=float(bpd.std(ddof=1) / math.sqrt(n)), spread=float(bpd.std(ddof=1)),
                         bias=None if bias is None else bias.bias,
                         bias_se=None if bias is None else bias.bias_se,
                         per_image_solver_rms=None if bias is None else float(np.sqrt(np.mean(
                             (np.asarray(bias.bpd, np.float64) - bias.bpd_tight) ** 2))),
                         nfe=float(np.mean(nfe)), wall=wall, wall_per_image=wall / n))
        per_image[method] = bpd.tolist()
        print(f"  {name} {method}: {bpd.mean():.4f} +- {bpd.std(ddof=1) / math.sqrt(n):.4f} "
              f"nfe {np.mean(nfe):.1f} wall {wall:.1f}s", flush=True)
        if args.json:  # partial results survive an interrupted run
            with open(args.json + ".partial", "w") as f:
                json.dump({"rows": rows, "per_image": {name: per_image}}, f)

    uni = pf.UniformDequantization()
    tn = pf.TruncatedNormalDequantization()
    k1 = jax.random.fold_in(key, 1)
    r, wall = _timed(lambda: pf.bits_per_dim(model, sde, images, key=k1, **common))
    check = pf.estimate_solver_bias(model, sde, images, key=jax.random.fold_in(key, 2),
                                    num_images=args.check, **common)
    add("ODE, uniform, K=1", r.bpd, r.nfe, wall, check)
    r, wall = _timed(lambda: pf.bits_per_dim(model, sde, images, key=k1, dequantization=tn,
                                             **common))
    check = pf.estimate_solver_bias(model, sde, images, key=jax.random.fold_in(key, 2),
                                    num_images=args.check, dequantization=tn, **common)
    add("ODE, truncated-normal, K=1", r.bpd, r.nfe, wall, check)
    bound = pf.VariationalBound(num_times=args.elbo_times)
    r, wall = _timed(lambda: pf.bits_per_dim(model, sde, images, key=k1, method=bound, **common))
    add(f"ELBO ({args.elbo_times} + 16 draws)", r.bpd, r.nfe, wall)
    m = min(args.iw_limit, n)
    sub = images[:m]
    r, wall = _timed(lambda: pf.bits_per_dim(model, sde, sub, key=jax.random.fold_in(key, 3),
                                             dequantization=uni, importance_samples=16, **common))
    nfe_draw = np.asarray(r.nfe) / 16
    tag = "" if m == n else f", first {m} images"
    add(f"ODE, uniform, K=1 (mean of 16 draws{tag})", _iw(r.log_weights, 1, d), nfe_draw,
        wall / 16)
    add(f"ODE, uniform, K=4 (IW{tag})", _iw(r.log_weights, 4, d), nfe_draw * 4, wall / 4)
    add(f"ODE, uniform, K=16 (IW{tag})", _iw(r.log_weights, 16, d), nfe_draw * 16, wall)
    ode_se = rows[0]["se"]
    for row in rows:
        need = (row["spread"] / ode_se) ** 2
        row["time_to_ode_se"] = need * row["wall_per_image"]
    return rows, per_image


def _table(rows):
    head = ["model", "method", "bits/dim", "std err", "solver bias", "per-image solver error",
            "NFE/image", "wall (s)", "time to ODE se (s)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bias = "-" if r["bias"] is None else f"{r['bias']:+.4f} ± {r['bias_se']:.4f}"
        rms = "-" if r["bias"] is None else f"{r['per_image_solver_rms']:.4f}"
        out.append(f"| {r['model']} | {r['method']} | {r['bpd']:.4f} | {r['se']:.4f} | {bias} | "
                   f"{rms} | "
                   f"{r['nfe']:.0f} | {r['wall']:.0f} | {r['time_to_ode_se']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--models", default="digits-vp,digits-subvp")
    p.add_argument("--check", type=int, default=16)
    p.add_argument("--iw-limit", type=int, default=300,
                   help="images for the importance-weighted run (16 solves each)")
    p.add_argument("--elbo-times", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, metavar="A.json,B.json",
                   help="no measurement: merge earlier --json outputs (one process per model), "
                        "print the table and draw the figure")
    args = p.parse_args(argv)
    rows, per_image = [], {}
    if args.from_json:
        for path in args.from_json.split(","):
            with open(path) as f:
                got = json.load(f)
            rows += got["rows"]
            per_image.update(got["per_image"])
        images = np.zeros((got["num_images"],))
    else:
        ds = pf.data.load("digits", split="test")
        images = np.asarray(ds.images[: args.limit])
        print(f"{images.shape[0]} test digits; jax {jax.__version__} on "
              f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores", flush=True)
        for name in args.models.split(","):
            rr, pi = run_model(name, images, ds.num_bins, args, jax.random.key(args.seed))
            rows += rr
            per_image[name] = pi
    print(_table(rows))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "per_image": per_image, "num_images": int(images.shape[0])},
                      f, indent=1)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(per_image)
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.2))
        for ax, name in zip(np.atleast_1d(axes), names):
            ode = np.asarray(per_image[name]["ODE, uniform, K=1"])
            elbo_key = next(k for k in per_image[name] if k.startswith("ELBO"))
            elbo = np.asarray(per_image[name][elbo_key])
            ax.scatter(ode, elbo, s=8, alpha=0.6)
            lo, hi = min(ode.min(), elbo.min()), max(ode.max(), elbo.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="ELBO = ODE")
            ax.set_xlabel("ODE bits/dim (uniform, K = 1)")
            ax.set_ylabel("ELBO bits/dim")
            ax.set_title(f"{name}: {len(ode)} test digits")
            ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig("docs/img/likelihood-elbo-vs-ode.png", dpi=110)


if __name__ == "__main__":
    main()
