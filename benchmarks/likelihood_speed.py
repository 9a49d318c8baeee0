"""Likelihood speed: probflow vs the paper's reference design, torchdiffeq, and a bare-loop floor.

One run times, side by side, the exact log-likelihood (probability-flow ODE augmented with
Hutchinson's divergence, appendix D of Song et al. 2021) of the same batch under the same score
network:

  (a)  probflow: `pf.log_likelihood`, Tsit5 (the default), plus divergence_mode="vjp" and Dopri5;
  (b)  the reference code's design: scipy `solve_ivp(method="RK45")` on the host with the whole
       batch flattened into one state vector, a jitted JAX drift and a SEPARATE jitted Hutchinson
       divergence (a vjp: 2 forward + 1 backward pass per evaluation) called from the callback;
  (c)  torchdiffeq `odeint(method="dopri5")`, the network ported to torch with the same weights,
       divergence by torch.autograd (one forward + one vjp per evaluation), best thread count;
  (d)  the floor: as many batched network+JVP evaluations as probflow's vmapped solve performed
       (its max per-example NFE), in a bare jitted `lax.fori_loop` with no solver logic.

Setup: 64-d data (a fixed Gaussian-mixture sample, batch 128), an MLP score network with three
hidden layers of 256 (SiLU), input [x, log std(t)], parametrised like the paper's continuous VP
models, score = -net(x, t) / std(t), with random but fixed weights (no training needed); VP SDE,
one Rademacher probe per example (the same probe in every method), rtol = atol = 1e-5, eps = 1e-5,
float32. Every method is timed after a warm-up call; the methods are timed in interleaved rounds
(one call of each per round, so background load hits all alike) and the median is reported.

All methods estimate the same quantity: div F = D f(t) - 1/2 g(t)^2 eps^T (d score / dx) eps, the
linear drift's divergence exact and Hutchinson's estimate for the score part (with Rademacher
probes this equals Hutchinson on the whole drift, as probflow computes it), so with the same
probe the log-likelihoods agree up to solver error.

Run:  python benchmarks/likelihood_speed.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import probflow as pf

DIM = 64
HIDDEN = 256
DEPTH = 3
EPS = 1e-5
RTOL = ATOL = 1e-5
SEED = 0


# --------------------------------------------------------------------------- shared setup


def make_weights(seed: int = SEED):
    """[(W, b)] for 65 -> 256 -> 256 -> 256 -> 64, float32, fixed.

    W ~ N(0, 1/fan_in) keeps SiLU activations O(1); the last layer is scaled so the noise
    prediction is O(0.3), like a trained epsilon-predictor on in-distribution data.
    """
    rng = np.random.default_rng(seed)
    sizes = [DIM + 1] + [HIDDEN] * DEPTH + [DIM]
    layers = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        gain = 0.3 if i == len(sizes) - 2 else 1.0
        w = (gain * rng.standard_normal((m, n)) / math.sqrt(m)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        layers.append((w, b))
    return layers


def make_data(batch: int, seed: int = SEED) -> np.ndarray:
    """A fixed sample from a 4-component Gaussian mixture in 64-d (float32, [batch, 64])."""
    rng = np.random.default_rng(seed + 1)
    means = rng.standard_normal((4, DIM))
    comp = rng.integers(0, 4, size=batch)
    x = means[comp] + 0.5 * rng.standard_normal((batch, DIM))
    return x.astype(np.float32)


class MLPScore(eqx.Module):
    """score(t, x) = -net([x, log std(t)]) / std(t) for one example (the paper's VP design)."""

    weights: tuple
    biases: tuple
    sde: pf.VPSDE

    def __init__(self, layers, sde):
        self.weights = tuple(jnp.asarray(w) for w, _ in layers)
        self.biases = tuple(jnp.asarray(b) for _, b in layers)
        self.sde = sde

    def __call__(self, t, x):
        _, std = self.sde.marginal(t)
        std = std.astype(x.dtype)
        h = jnp.concatenate([x, jnp.log(std)[None]])
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = jax.nn.silu(h @ w + b)
        out = h @ self.weights[-1] + self.biases[-1]
        return -out / std


def probflow_probes(key, batch: int) -> np.ndarray:
    """The Rademacher probes probflow draws for `key` (one per example), for the baselines."""
    keys = jax.random.split(key, batch)
    draw = jax.vmap(lambda k: jax.random.rademacher(k, (1, DIM), jnp.float32)[0])
    return np.asarray(draw(keys))


class Method:
    """A timed method: `run()` does one full likelihood computation, `summary(out)` its row."""

    def __init__(self, run, summary, setup=None):
        self.run, self.summary, self.setup = run, summary, setup
        self.times: list[float] = []
        self.out = None

    def call(self):
        if self.setup is not None:
            self.setup()
        t0 = time.perf_counter()
        self.out = self.run()
        return time.perf_counter() - t0


def time_round_robin(methods: dict, repeats: int, log=print):
    """Warm up every method once, then time `repeats` rounds, one call of each method per round.

    Interleaving spreads any background load on a shared machine evenly over the methods, so the
    ratios stay meaningful even when absolute times drift.
    """
    for name, m in methods.items():
        m.call()
        log(f"  warmed up {name}")
    for _ in range(repeats):
        for m in methods.values():
            m.times.append(m.call())
    rows = {}
    for name, m in methods.items():
        row = m.summary(m.out)
        row.update(time=statistics.median(m.times), time_min=min(m.times), times=m.times)
        rows[name] = row
    return rows


# --------------------------------------------------------------------------- (a) probflow


def probflow_method(model, sde, x, key, *, solver, divergence_mode):
    xj = jnp.asarray(x)

    def run():
        r = pf.log_likelihood(
            model, sde, xj, key=key, trace="rademacher", num_probes=1, eps=EPS, solver=solver,
            rtol=RTOL, atol=ATOL, divergence_mode=divergence_mode,
        )
        jax.block_until_ready(r.logp)
        return r

    def summary(r):
        nfe = np.asarray(r.nfe)
        # vmap of a while loop runs every example's body until the slowest one finishes: the
        # batched evaluations performed equal the max per-example count.
        return dict(logp=np.asarray(r.logp, np.float64), nfe_mean=float(nfe.mean()),
                    nfe_max=int(nfe.max()), nfe_min=int(nfe.min()), batched_evals=int(nfe.max()))

    return Method(run, summary)


# --------------------------------------------------------------------------- (b) scipy RK45


def scipy_method(model, sde, x, probes):
    """The reference code's design (score_sde/likelihood.py): scipy on the host, one flat state."""
    from scipy.integrate import solve_ivp

    B = x.shape[0]
    shape = x.shape

    def drift_one(t, xi):
        return sde.drift_coef(t) * xi - 0.5 * sde.diffusion(t) ** 2 * model(t, xi)

    @jax.jit
    def drift_fn(xb, t):
        return jax.vmap(lambda xi: drift_one(t, xi))(xb)

    @jax.jit
    def div_fn(xb, t, eps):
        # Hutchinson by a vjp of the score (jax.grad of <score, eps>: a forward and a backward
        # pass), as the reference's get_div_fn; the linear drift's divergence D f(t) exactly, as
        # probflow does, so that both estimate the same quantity.
        def one(xi, ei):
            g = jax.grad(lambda d: jnp.sum(model(t, d) * ei))(xi)
            return sde.drift_coef(t) * xi.size - 0.5 * sde.diffusion(t) ** 2 * jnp.sum(g * ei)

        return jax.vmap(one)(xb, eps)

    eps_j = jnp.asarray(probes)

    def ode_func(t, y):
        sample = jnp.asarray(y[:-B].reshape(shape), jnp.float32)
        tt = jnp.asarray(t, jnp.float32)
        drift = np.asarray(drift_fn(sample, tt), np.float64).reshape(-1)
        logp_grad = np.asarray(div_fn(sample, tt, eps_j), np.float64).reshape(-1)
        return np.concatenate([drift, logp_grad], axis=0)

    init = np.concatenate([x.reshape(-1).astype(np.float64), np.zeros(B)])

    def run():
        sol = solve_ivp(ode_func, (EPS, sde.T), init, rtol=RTOL, atol=ATOL, method="RK45")
        if not sol.success:
            raise RuntimeError(f"scipy solve_ivp failed: {sol.message}")
        return sol

    def summary(sol):
        zp = sol.y[:, -1]
        z, delta = zp[:-B].reshape(shape), zp[-B:]
        logp = -0.5 * DIM * math.log(2 * math.pi) - 0.5 * np.sum(z * z, axis=1) + delta
        n = int(sol.nfev)
        return dict(logp=logp, nfe_mean=float(n), nfe_max=n, batched_evals=n)

    return Method(run, summary)


# --------------------------------------------------------------------------- (c) torchdiffeq


def torch_method(layers, sde, x, probes, threads: int):
    import torch
    from torchdiffeq import odeint

    Ws = [torch.from_numpy(np.array(w)) for w, _ in layers]
    bs = [torch.from_numpy(np.array(b)) for _, b in layers]
    bmin, bmax = sde.beta_min, sde.beta_max

    def net_score(t, xb):  # MLPScore, ported
        b_int = bmin * t + 0.5 * (bmax - bmin) * t * t
        std = torch.sqrt(-torch.expm1(-b_int))
        h = torch.cat([xb, torch.log(std).expand(xb.shape[0], 1)], dim=1)
        for w, b in zip(Ws[:-1], bs[:-1], strict=True):
            h = torch.nn.functional.silu(h @ w + b)
        return -(h @ Ws[-1] + bs[-1]) / std

    eps_t = torch.from_numpy(np.array(probes))
    counter = [0]

    def func(t, state):
        xb, _ = state
        counter[0] += 1
        beta = bmin + t * (bmax - bmin)
        f, g2 = -0.5 * beta, beta
        with torch.enable_grad():  # one forward and one vjp per evaluation
            xg = xb.detach().requires_grad_(True)
            score = net_score(t, xg)
            (vjp,) = torch.autograd.grad(score, xg, eps_t)
        dx = f * xb - 0.5 * g2 * score.detach()
        div = f * DIM - 0.5 * g2 * torch.sum(vjp * eps_t, dim=1)
        return dx, div

    x0 = torch.from_numpy(np.array(x))
    d0 = torch.zeros(x.shape[0])
    ts = torch.tensor([EPS, sde.T], dtype=torch.float32)

    def run():
        counter[0] = 0
        with torch.no_grad():
            zs, ds = odeint(func, (x0, d0), ts, rtol=RTOL, atol=ATOL, method="dopri5")
        return zs[-1].double().numpy(), ds[-1].double().numpy(), counter[0]

    def summary(out):
        z, delta, n = out
        logp = -0.5 * DIM * math.log(2 * math.pi) - 0.5 * np.sum(z * z, axis=1) + delta
        return dict(logp=logp, nfe_mean=float(n), nfe_max=int(n), batched_evals=int(n),
                    threads=threads)

    return Method(run, summary, setup=lambda: torch.set_num_threads(threads))


# --------------------------------------------------------------------------- (d) floor


def floor_method(model, sde, x, probes, num_evals, divergence_mode="jvp"):
    """`num_evals` batched evaluations of probflow's own augmented vector field, nothing else."""
    B = x.shape[0]

    @eqx.filter_jit
    def floor(model, xb, probes):
        def one(xi, pi, t):
            vf = pf.AugmentedProbabilityFlowODE(model, sde, pi[None], divergence_mode)
            return vf(t, (xi, jnp.zeros((), xi.dtype)), None)

        vf = jax.vmap(one, in_axes=(0, 0, None))
        h = (sde.T - EPS) / num_evals

        def body(i, carry):
            xb, delta = carry
            t = EPS + i.astype(xb.dtype) * h
            dx, div = vf(xb, probes, t)  # sequential dependence, like a solver's stages
            return xb + h * dx, delta + h * div

        return jax.lax.fori_loop(0, num_evals, body, (xb, jnp.zeros((B,), xb.dtype)))

    xj, pj = jnp.asarray(x), jnp.asarray(probes)

    def run():
        out = floor(model, xj, pj)
        jax.block_until_ready(out)
        return out

    def summary(_):
        return dict(logp=None, nfe_mean=float(num_evals), nfe_max=int(num_evals),
                    batched_evals=int(num_evals))

    return Method(run, summary)


# --------------------------------------------------------------------------- main

NAMES = {
    "a": "(a) probflow Tsit5, jvp (default)",
    "a_vjp": "(a') probflow Tsit5, divergence_mode=vjp",
    "a_dopri5": "(a'') probflow Dopri5, jvp",
    "b": "(b) scipy RK45 + jitted drift/div (ref.)",
    "c1": "(c) torchdiffeq dopri5, 1 thread",
    "c2": "(c) torchdiffeq dopri5, 2 threads",
    "d": "(d) floor: bare fori_loop, JVP evals",
    "d_vjp": "(d') floor: bare fori_loop, VJP evals",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: batch 16, 1 round, torch with 1 thread only")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 128; 16 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default 7; 1 with --quick)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    batch = args.batch or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 7)
    if batch < 1 or repeats < 1:
        p.error("--batch and --repeats must be >= 1")

    sde = pf.VPSDE()
    layers = make_weights()
    model = MLPScore(layers, sde)
    x = make_data(batch)
    key = jax.random.key(SEED)
    probes = probflow_probes(key, batch)
    print(f"likelihood speed: batch {batch}, {DIM}-d, MLP 3x{HIDDEN} SiLU, VP SDE, Rademacher "
          "probe, "
          f"rtol=atol={RTOL}, eps={EPS}, float32, {jax.default_backend()}, "
          f"{os.cpu_count()} CPU(s); median of {repeats} interleaved rounds after warm-up",
          flush=True)

    # The floor needs probflow's evaluation count, so probflow runs once first (its warm-up).
    a = probflow_method(model, sde, x, key, solver=diffrax.Tsit5(), divergence_mode="jvp")
    a.call()
    n_evals = a.summary(a.out)["batched_evals"]
    methods = {
        "a": a,
        "a_vjp": probflow_method(model, sde, x, key, solver=diffrax.Tsit5(),
                                 divergence_mode="vjp"),
        "a_dopri5": probflow_method(model, sde, x, key, solver=diffrax.Dopri5(),
                                    divergence_mode="jvp"),
        "b": scipy_method(model, sde, x, probes),
        "c1": torch_method(layers, sde, x, probes, threads=1),
        "d": floor_method(model, sde, x, probes, n_evals, "jvp"),
        "d_vjp": floor_method(model, sde, x, probes, n_evals, "vjp"),
    }
    if not args.quick:  # 2 threads can be very slow on a loaded 2-core machine
        methods["c2"] = torch_method(layers, sde, x, probes, threads=2)
    rows = time_round_robin(methods, repeats, log=lambda s: print(s, flush=True))
    best_c = min((k for k in ("c1", "c2") if k in rows), key=lambda k: rows[k]["time"])
    print()

    ref = rows["a"]["logp"]
    widths = (40, 8, 8, 20, 10, 12)
    cols = ("method", "time (s)", "min (s)", "NFE/example mean/max", "mean logp", "max|dlogp|")
    header = "| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                               for i, (c, w) in enumerate(zip(cols, widths, strict=True))) + " |"
    lines = [header, "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for k, name in NAMES.items():
        if k not in rows:
            continue
        r = rows[k]
        if k.startswith("a"):
            nfe = f"{r['nfe_mean']:.1f} / {r['nfe_max']}"
        else:
            nfe = f"{r['nfe_max']} (batched)"
        if r["logp"] is None:
            mlp = diff = "-"
        else:
            r["mean_logp"] = float(np.mean(r["logp"]))
            r["max_abs_dlogp_vs_a"] = float(np.max(np.abs(r["logp"] - ref)))
            mlp, diff = f"{r['mean_logp']:.4f}", f"{r['max_abs_dlogp_vs_a']:.1e}"
        if k in ("c1", "c2") and k == best_c:
            name += " *"
        lines.append(f"| {name:<40} | {r['time']:>8.3f} | {r['time_min']:>8.3f} | {nfe:>20} | "
                     f"{mlp:>10} | {diff:>12} |")
    ta = rows["a"]["time"]
    ratios = {
        "b_over_a": rows["b"]["time"] / ta,
        "c_over_a": rows[best_c]["time"] / ta,
        "a_over_d": ta / rows["d"]["time"],
        "a_vjp_over_a": rows["a_vjp"]["time"] / ta,
        "a_dopri5_over_a": rows["a_dopri5"]["time"] / ta,
        "d_vjp_over_d": rows["d_vjp"]["time"] / rows["d"]["time"],
    }
    tm = {k: r["time_min"] for k, r in rows.items()}
    ratios_min = {
        "b_over_a": tm["b"] / tm["a"],
        "c_over_a": tm[best_c] / tm["a"],
        "a_over_d": tm["a"] / tm["d"],
    }
    targets = {"b_over_a": (">=", 3.0), "c_over_a": (">=", 1.3), "a_over_d": ("<=", 1.25)}
    print("\n".join(lines))
    print("\n* torch's best thread count. max|dlogp|: max over the batch of |logp - logp(a)| "
          "in nats.")
    verdicts = {}
    for k, label in [("b_over_a", "(b)/(a)"), ("c_over_a", "(c)/(a)"), ("a_over_d", "(a)/(d)")]:
        op, v = targets[k]
        ok = ratios[k] >= v if op == ">=" else ratios[k] <= v
        verdicts[k] = ok
        print(f"{label} = {ratios[k]:5.2f}x   target {op} {v}: {'met' if ok else 'MISSED'}"
              f"   (from the fastest runs: {ratios_min[k]:.2f}x)")
    print(f"(a')/(a) = {ratios['a_vjp_over_a']:.2f}x (reverse vs forward mode), "
          f"(a'')/(a) = {ratios['a_dopri5_over_a']:.2f}x (Dopri5 vs Tsit5), "
          f"(d')/(d) = {ratios['d_vjp_over_d']:.2f}x")
    print(
        "\nNotes: probflow solves each example with its own adaptive steps (a vmapped while loop: "
        "NFE per example; the loop runs the batched\nbody as often as the slowest example needs). "
        "(b) and (c) solve the whole batch jointly, one step size and one error norm for\nthe "
        "batch, so their NFE is the count of batched evaluations. (d) runs (a)'s max per-example "
        "NFE batched evaluations of the same\nvector field with no solver logic. The same "
        "Rademacher probe per example everywhere; per evaluation (b) spends a drift pass plus "
        "a\nseparate "
        "forward+backward pass (3 network passes), (c) a forward+backward, (a) and (d) one JVP, "
        "(a') and (d') one VJP."
    )

    if args.json:
        def clean(r):
            return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}

        out = dict(
            config=dict(batch=batch, dim=DIM, hidden=HIDDEN, depth=DEPTH, eps=EPS, rtol=RTOL,
                        atol=ATOL, repeats=repeats, quick=args.quick, sde="VPSDE()",
                        probe="rademacher, 1 per example", dtype="float32"),
            environment=dict(python=sys.version.split()[0], jax=jax.__version__,
                             diffrax=importlib.metadata.version("diffrax"),
                             torch=_version("torch"), scipy=_version("scipy"),
                             torchdiffeq=_version("torchdiffeq"), platform=platform.platform(),
                             cpu_count=os.cpu_count(), backend=jax.default_backend()),
            rows={NAMES[k]: clean(v) for k, v in rows.items()},
            torch_best_threads=rows[best_c]["threads"],
            ratios=ratios,
            ratios_from_min_times=ratios_min,
            targets_met=verdicts,
        )
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
