"""Test-set bits/dim on real networks: probflow against the paper's likelihood code, one run.

Two problems, every method on the same dequantized images and the same Rademacher probes:

- digits: the 300 test digits (8x8, 17 bins) under the shipped `pf.load_pretrained("digits-vp")`;
- mnist: the mnist-5k test split (28x28, 256 bins) under a small U-Net trained on the mnist-5k
  training split in this script's set-up (probflow ships no MNIST model). Training uses `pf.train`
  with a held-out validation split and stops after `--train-steps` steps (300 by default: about
  5 minutes on 2 busy CPU cores); the checkpoint is cached under `--out` and reused by reruns.

Methods (the wall time to the test-set mean bits/dim, compilation timed separately):

  (a) probflow at its defaults: `pf.bits_per_dim(model, sde, x_int, key=key, num_bins=...)`;
  (b) probflow's best setting (`--best-solver`, `--best-tol`, `--best-time`): the fastest
      setting of the work-precision sweep whose bias stays below 1e-3 bits/dim, Dopri5 at
      rtol = atol = 3e-4 in sqrt(t) time, with this device's slot count (since this
      measurement, also bits_per_dim's defaults, so (a) and (b) are one setting);
  (c) the paper's design (score_sde/likelihood.py) written for this model: scipy
      `solve_ivp(method="RK45")` on the host over the flattened batch, rtol = atol = 1e-5, the
      drift and the divergence (a VJP of the whole drift with the Rademacher probe, the paper's
      `get_div_fn`) as two separate jitted calls per evaluation;
  (d) the floor: (b)'s mean NFE times the cost of one batched evaluation of the same vector
      field (one JVP of the network for `slots` examples, in a jitted loop), per example.

Accuracy: a float64 re-solve of the first `--ref` images (Dopri8 in sqrt(t) time at
rtol = atol = 1e-7, checked against 1e-6 on the first 8, in a subprocess with x64 enabled,
cached) with the same inputs and probes; "bias" is the mean over those images of
(method - reference), with its standard error. The standard error of each test-set mean is the
spread of its per-image values / sqrt(N).

`--figure` adds a work-precision sweep on the reference images (Tsit5, Dopri5, Bosh3 at several
tolerances in t and sqrt(t) time, adaptive DPM-Solver-3, DPM-Solver++(3M) with fixed steps):
error against time and against NFE, written to docs/img/likelihood-work-precision.png.

Run:  python benchmarks/likelihood_real.py [--device cpu|gpu] [--data digits,mnist]
      [--limit N] [--ref N] [--figure] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import probflow as pf
from probflow._options import default_slots
from probflow._refill import refill_solve

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = {"Tsit5": diffrax.Tsit5(), "Dopri5": diffrax.Dopri5(), "Bosh3": diffrax.Bosh3()}
EPS = 1e-5
PAPER_TOL = 1e-5
REF_TOL = 1e-7
SEED = 0


# --------------------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
    name: str
    model: object
    sde: object
    x_int: np.ndarray  # [N, H, W, C] test images
    num_bins: int
    data_range: tuple[float, float]
    model_source: str  # "pretrained:NAME" or a checkpoint path
    notes: dict

    @property
    def dim(self) -> int:
        return int(np.prod(self.x_int.shape[1:]))

    def to_bpd(self, logp):
        lo, hi = self.data_range
        d = self.dim
        return -(np.asarray(logp, np.float64) + d * math.log((hi - lo) / self.num_bins)) / (
            d * math.log(2.0)
        )


def load_model(source: str):
    if source.startswith("pretrained:"):
        return pf.load_pretrained(source.split(":", 1)[1])
    model, sde, _ = pf.load_checkpoint(source)
    return model, sde


def digits_problem(limit: int | None) -> Problem:
    model, sde = pf.load_pretrained("digits-vp")
    test = pf.data.load("digits", split="test")
    x = np.asarray(test.images[:limit])
    return Problem("digits", model, sde, x, test.num_bins, tuple(test.data_range),
                   "pretrained:digits-vp", {"model": "digits-vp (shipped)"})


def mnist_problem(limit: int | None, out: Path, train_steps: int, log) -> Problem:
    from probflow._baselines import categorical_bpd
    from probflow.models import UNet

    run = out / f"mnist5k-unet-lik-{train_steps}"
    ckpt = run / "checkpoint.eqx"
    sde = pf.VPSDE()
    train_all = pf.data.load("mnist-5k", split="train")
    train_ds, valid = train_all.hold_out(200, seed=0)
    test = pf.data.load("mnist-5k", split="test")
    notes = {"train_steps": train_steps, "train_images": len(train_ds), "validation_images": 200}
    if not (run / "done").exists():
        # The digits models' recipe (scripts/train_digits.py), shortened: likelihood weighting
        # with importance sampling, Adam with warm-up and clipping, EMA.
        model = UNet((28, 28, 1), sde=sde, channels=(16, 32, 32), key=jax.random.key(SEED))
        config = pf.TrainConfig(
            steps=train_steps, batch_size=32, lr=1e-3, warmup=100, steps_per_call=1,
            weighting="likelihood", importance_sampling=True,
            checkpoint_every=max(train_steps // 4, 1), log_every=25, seed=SEED,
        )
        log(f"training the mnist-5k U-Net: {train_steps} steps, channels (16, 32, 32), "
            f"batch 32 -> {run}")
        t0 = time.perf_counter()
        resume = (run / "checkpoint.eqx").exists()
        if run.exists() and not resume:  # a run that stopped before its first checkpoint
            shutil.rmtree(run)
        pf.train(model, sde, train_ds, config, out=run, resume=resume, progress=False)
        notes["train_seconds"] = time.perf_counter() - t0
        (run / "done").write_text(f"{notes['train_seconds']:.0f} s\n")
        log(f"  trained in {notes['train_seconds']:.0f} s")
    model, sde2, _ = pf.load_checkpoint(ckpt)
    # Validation bits/dim (100 held-out training images) beside per-pixel categoricals.
    vfile = run / "validation.json"
    if not vfile.exists():
        vx = np.asarray(valid.images[:100])
        r = pf.bits_per_dim(model, sde2, vx, key=jax.random.key(1), num_bins=valid.num_bins,
                            data_range=valid.data_range, rtol=1e-4, atol=1e-4)
        vfile.write_text(json.dumps({
            "validation_bpd": float(np.mean(np.asarray(r.bpd))),
            "validation_se": float(np.std(np.asarray(r.bpd), ddof=1) / 10.0),
            "categorical_baseline_bpd": categorical_bpd(train_ds.images, vx, valid.num_bins),
        }))
    notes.update(json.loads(vfile.read_text()))
    log(f"  mnist U-Net: validation bits/dim {notes['validation_bpd']:.3f} ± "
        f"{notes['validation_se']:.3f} on 100 held-out "
        f"images (per-pixel categoricals: {notes['categorical_baseline_bpd']:.3f})")
    x = np.asarray(test.images[:limit])
    return Problem("mnist", model, sde2, x, test.num_bins, tuple(test.data_range), str(ckpt),
                   notes)


def probflow_draws(key, x_int, num_bins, data_range, num_probes=1):
    """The model-space inputs and probes that `pf.bits_per_dim(..., key=key)` uses.

    bits_per_dim splits `key` into the dequantization key and the probe key, draws u ~ U[0, 1)
    of the batch's shape, and gives each example `split(probe_key, B)[i]`; the Rademacher
    estimator draws [num_probes, *shape] from it. (The table checks that (b) and the engine
    agree on these inputs.)
    """
    lo, hi = data_range
    k_deq, k_probe = jax.random.split(key)
    u = jax.random.uniform(k_deq, x_int.shape, jnp.float32)
    x = lo + (hi - lo) * (jnp.asarray(x_int, jnp.int32).astype(jnp.float32) + u) / num_bins
    keys = jax.random.split(k_probe, x_int.shape[0])
    shape = (num_probes,) + tuple(x_int.shape[1:])
    probes = jax.vmap(lambda k: jax.random.rademacher(k, shape, jnp.float32))(keys)
    return np.asarray(x), np.asarray(probes)


# --------------------------------------------------------------------------- probflow's engine


_CLOCKS = {"t": pf.LinearTime(), "sqrt_t": pf.SqrtTime(), "log_snr": pf.LogSNRTime()}


def _augmented(model, sde, probes, mode="jvp"):
    return pf.AugmentedProbabilityFlowODE(model, sde, probes, mode)


@eqx.filter_jit
def _engine(model, sde, x, probes, rtol, atol, solver, time_, slots):
    y0 = (x, jnp.zeros((x.shape[0],), x.dtype))
    opts = pf.ODEOptions(solver=solver, rtol=rtol, atol=atol, time=_CLOCKS[time_],
                         scheduler=pf.Refill(slots))
    (z, delta), nfe, steps, failure = refill_solve(
        lambda p: _augmented(model, sde, p), y0, probes, EPS, sde.T, opts, sde=sde
    )
    status = jnp.where(failure.code == 0, 1, 0)  # 1: finished
    return jax.vmap(sde.prior_logp)(z) + delta, nfe, status


@eqx.filter_jit
def _lockstep_fixed(model, sde, x, probes, solver, steps, time_):
    from probflow._flow import solve_flow

    opts = pf.ODEOptions(solver=solver, steps=steps, time=time_)

    def one(xi, pi):
        vf = _augmented(model, sde, pi)
        y0 = (xi, jnp.zeros((), xi.dtype))
        (z, delta), nfe, _, _ = solve_flow(vf, y0, EPS, sde.T, opts, sde=sde)
        return sde.prior_logp(z) + delta, nfe

    return jax.vmap(one)(x, probes)


def run_engine(problem, x, probes, *, solver, tol, time_="t", slots=64, steps=None):
    """(bpd [N], nfe [N], seconds) of one engine solve on explicit inputs."""
    t0 = time.perf_counter()
    if steps is None:
        dt = jnp.asarray(tol, x.dtype)
        logp, nfe, status = _engine(problem.model, problem.sde, jnp.asarray(x),
                                    jnp.asarray(probes), dt, dt, solver, time_, slots)
        status = np.asarray(status)
        if not np.all(status == 1):
            raise RuntimeError(f"engine solve failed: status {np.unique(status)}")
    else:
        logp, nfe = _lockstep_fixed(problem.model, problem.sde, jnp.asarray(x),
                                    jnp.asarray(probes), solver, steps, time_)
    logp = np.asarray(jax.block_until_ready(logp))
    return problem.to_bpd(logp), np.asarray(nfe), time.perf_counter() - t0


# --------------------------------------------------------------------------- (a), (b)


def run_bits_per_dim(problem, key, options):
    """One `pf.bits_per_dim` call on the whole test subset: (bpd, nfe, seconds)."""
    t0 = time.perf_counter()
    r = pf.bits_per_dim(problem.model, problem.sde, problem.x_int, key=key,
                        num_bins=problem.num_bins, data_range=problem.data_range, **options)
    bpd = np.asarray(jax.block_until_ready(r.bpd), np.float64)
    return bpd, np.asarray(r.nfe), time.perf_counter() - t0


def timed_twice(fn, log, label):
    """Call `fn` twice: the first call compiles. Returns the second call's (bpd, nfe, wall s,
    compile s, CPU s); CPU time (all threads of this process) is less sensitive than wall time
    to other jobs on a shared machine."""
    _, _, t_first = fn()
    c0 = time.process_time()
    out = fn()
    cpu = time.process_time() - c0
    compile_s = max(t_first - out[2], 0.0)
    log(f"  {label}: {out[2]:.2f} s wall, {cpu:.2f} s CPU (compile about {compile_s:.1f} s)")
    return out[0], out[1], out[2], compile_s, cpu


# --------------------------------------------------------------------------- (c) the paper's


def paper_method(problem, x, probes, batch, log):
    """score_sde's likelihood.py for this model: (bpd, nfe per batch, run s, compile s)."""
    from scipy.integrate import solve_ivp

    model, sde = problem.model, problem.sde
    shape = x.shape[1:]

    def drift(t, xi):  # the probability-flow drift, rsde.sde(x, t)[0] of the paper's code
        return sde.drift_coef(t) * xi - 0.5 * sde.diffusion(t) ** 2 * model(t, xi)

    @jax.jit
    def drift_fn(xb, t):
        return jax.vmap(lambda xi: drift(t, xi))(xb)

    @jax.jit
    def div_fn(xb, t, eps):  # get_div_fn: Hutchinson by a VJP of the whole drift
        def one(xi, ei):
            g = jax.grad(lambda d: jnp.sum(drift(t, d) * ei))(xi)
            return jnp.sum(g * ei)

        return jax.vmap(one)(xb, eps)

    def solve(xb, eb):
        b = xb.shape[0]
        eb = jnp.asarray(eb)

        def ode_func(t, y):
            sample = jnp.asarray(y[:-b].reshape((b,) + shape), jnp.float32)
            tt = jnp.asarray(t, jnp.float32)
            dx = np.asarray(drift_fn(sample, tt), np.float64).reshape(-1)
            dlogp = np.asarray(div_fn(sample, tt, eb), np.float64).reshape(-1)
            return np.concatenate([dx, dlogp], axis=0)

        init = np.concatenate([xb.reshape(-1).astype(np.float64), np.zeros(b)])
        sol = solve_ivp(ode_func, (EPS, sde.T), init, rtol=PAPER_TOL, atol=PAPER_TOL,
                        method="RK45")
        if not sol.success:
            raise RuntimeError(f"scipy solve_ivp failed: {sol.message}")
        zp = sol.y[:, -1]
        z, delta = zp[:-b].reshape((b,) + shape), zp[-b:]
        d = int(np.prod(shape))
        logp = -0.5 * d * math.log(2 * math.pi) - 0.5 * np.sum(z.reshape(b, -1) ** 2, 1) + delta
        return logp, int(sol.nfev)

    # Compilation: one call of each jitted function per batch shape.
    t0 = time.perf_counter()
    sizes = sorted({min(batch, x.shape[0] - i) for i in range(0, x.shape[0], batch)})
    for b in sizes:
        xs = jnp.asarray(x[:b])
        jax.block_until_ready(drift_fn(xs, jnp.float32(0.5)))
        jax.block_until_ready(div_fn(xs, jnp.float32(0.5), jnp.asarray(probes[:b, 0])))
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    logps, nfes = [], []
    for i in range(0, x.shape[0], batch):
        lp, n = solve(x[i:i + batch], probes[i:i + batch, 0])
        logps.append(lp)
        nfes.append(n)
    run_s, cpu = time.perf_counter() - t0, time.process_time() - c0
    log(f"  (c) paper's design, batch {batch}: {run_s:.2f} s wall, {cpu:.2f} s CPU (compile "
        f"{compile_s:.1f} s), NFE per batch {nfes}")
    return problem.to_bpd(np.concatenate(logps)), np.asarray(nfes), run_s, compile_s, cpu


# --------------------------------------------------------------------------- (d) the floor


def eval_cost(problem, slots, repeats=3, evals=8):
    """(wall, CPU) seconds of one batched evaluation of the augmented field for `slots`
    examples, each at its own time (as in an adaptive solve), the fastest of `repeats`."""
    model, sde = problem.model, problem.sde
    shape = problem.x_int.shape[1:]
    x = jax.random.uniform(jax.random.key(3), (slots,) + shape, jnp.float32)
    p = jax.random.rademacher(jax.random.key(4), (slots, 1) + shape, jnp.float32)

    @eqx.filter_jit
    def loop(model, x, p):
        def one(xi, pi, t):
            return _augmented(model, sde, pi)(t, (xi, jnp.zeros((), xi.dtype)), None)

        def body(i, carry):
            xb, d = carry
            t = 0.1 + 0.8 * (i + jnp.arange(slots, dtype=xb.dtype) / slots) / evals
            dx, dd = jax.vmap(one)(xb, p, t)
            return xb + 1e-3 * dx, d + dd  # sequential, like a solver's stages

        return jax.lax.fori_loop(0, evals, body, (x, jnp.zeros((slots,), x.dtype)))

    jax.block_until_ready(loop(model, x, p))
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(loop(model, x, p))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls) / evals, min(cpus) / evals


# --------------------------------------------------------------------------- the reference


def reference(problem, x, probes, out: Path, device: str, log):
    """float64 re-solve of (x, probes): bpd [n] (cached on disk by the inputs' hash)."""
    h = hashlib.sha256()
    for a in (x, probes):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(problem.model_source.encode())
    if problem.model_source.startswith("pretrained:"):
        from probflow._pretrained import pretrained_path

        h.update(pretrained_path(problem.model_source.split(":", 1)[1]).read_bytes())
    else:
        h.update(Path(problem.model_source).read_bytes())
    tag = h.hexdigest()[:16]
    cache = out / f"reference-{problem.name}-{tag}.npz"
    if not cache.exists():
        inp = out / f"reference-{problem.name}-{tag}-in.npz"
        np.savez(inp, x=x, probes=probes, source=problem.model_source)
        log(f"  float64 reference for {x.shape[0]} images (Dopri8, sqrt(t) time, "
            f"rtol = atol = {REF_TOL:g}) -> {cache.name}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--_reference", str(inp), str(cache),
                        "--device", device], check=True)
        log(f"  reference took {time.perf_counter() - t0:.0f} s")
        inp.unlink()
    ref = np.load(cache)
    bpd, check = problem.to_bpd(ref["logp"]), problem.to_bpd(ref["logp_check"])
    return bpd, float(np.abs(check - bpd[: check.shape[0]]).max()), ref


def _reference_main(inp, outp):
    data = np.load(inp)
    model, sde = load_model(str(data["source"]))
    jax.config.update("jax_enable_x64", True)
    cast = lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a
    model = jax.tree_util.tree_map(cast, model)
    x = jnp.asarray(data["x"], jnp.float64)
    probes = jnp.asarray(data["probes"], jnp.float64)
    n = x.shape[0]
    out = {}
    m = min(n, 8)
    for name, tol, k in (("logp", REF_TOL, n), ("logp_check", 10 * REF_TOL, m)):
        t = jnp.asarray(tol, jnp.float64)
        logp, nfe, status = _engine(model, sde, x[:k], probes[:k], t, t, diffrax.Dopri8(),
                                    "sqrt_t", k, 100_000)
        if not np.all(np.asarray(status) == 1):
            raise RuntimeError("reference solve failed")
        out[name] = np.asarray(logp, np.float64)
        out[name + "_nfe"] = np.asarray(nfe)
    np.savez(outp, **out)


# --------------------------------------------------------------------------- the table


def _stats(bpd, ref_bpd, nref):
    n = bpd.shape[0]
    err = bpd[:nref] - ref_bpd
    return dict(
        mean=float(bpd.mean()),
        se=float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        bias=float(err.mean()),
        bias_se=float(err.std(ddof=1) / math.sqrt(nref)) if nref > 1 else float("nan"),
        mean_abs_err=float(np.abs(err).mean()),
        max_abs_err=float(np.abs(err).max()),
    )


def evaluate_problem(problem, args, nref, log):
    key = jax.random.key(SEED)
    n = problem.x_int.shape[0]
    nref = min(nref, n)
    x, probes = probflow_draws(key, problem.x_int, problem.num_bins, problem.data_range)
    log(f"\n== {problem.name}: {n} test images of shape {problem.x_int.shape[1:]}, "
        f"{problem.num_bins} bins; reference on the first {nref}")
    ref_bpd, ref_check, _ = reference(problem, x[:nref], probes[:nref], args.out, args.device,
                                      log)
    log(f"  reference self-check (1e-6 vs 1e-7, first 8 images): max |difference| "
        f"{ref_check:.1e} bits/dim")
    rows = {}

    log("  (a) probflow defaults")
    bpd, nfe, t, c, cpu = timed_twice(lambda: run_bits_per_dim(problem, key, {}), log, "(a)")
    rows["a"] = dict(label="(a) probflow defaults", setting="pf.bits_per_dim defaults",
                     time=t, compile=c, cpu=cpu, nfe_mean=float(nfe.mean()), nfe_max=int(nfe.max()),
                     **_stats(bpd, ref_bpd, nref))
    best = dict(args.best_options)
    best.setdefault("slots", args.slots or default_slots(problem.x_int[0].size))
    label = f"{args.best_label}, slots {best['slots']}"
    log(f"  (b) probflow best: {label}")
    bpd_b, nfe_b, t, c, cpu = timed_twice(lambda: run_bits_per_dim(problem, key, best), log,
                                          "(b)")
    rows["b"] = dict(label="(b) probflow best", setting=label, time=t, compile=c,
                     cpu=cpu,
                     nfe_mean=float(nfe_b.mean()), nfe_max=int(nfe_b.max()),
                     **_stats(bpd_b, ref_bpd, nref))
    for i, batch in enumerate(args.paper_batches):
        bpd, nfe, t, c, cpu = paper_method(problem, x, probes, batch, log)
        rows["c" if i == 0 else f"c{batch}"] = dict(
            label="(c) paper's design", setting=f"scipy RK45 {PAPER_TOL:g}, batch {batch}",
            time=t, compile=c, cpu=cpu, nfe_mean=float(nfe.mean()), nfe_max=int(nfe.max()),
            batched=True, **_stats(bpd, ref_bpd, nref))
    slots = min(best["slots"], n)
    per_eval, per_eval_cpu = eval_cost(problem, slots)
    per_example = float(nfe_b.mean()) * n / slots
    rows["d"] = dict(label="(d) floor", setting=f"mean NFE of (b) x {per_eval * 1e3:.2f} ms "
                     f"per batched evaluation of {slots}", time=per_example * per_eval,
                     cpu=per_example * per_eval_cpu, compile=0.0,
                     nfe_mean=float(nfe_b.mean()), nfe_max=None)
    # More rounds, interleaved (a, b, the faster c, d), each keeping its fastest time: load from
    # other jobs on a shared machine then falls on every method alike.
    fast_c = min((k for k in rows if k.startswith("c")), key=lambda k: rows[k]["time"])
    c_batch = args.paper_batches[0] if fast_c == "c" else int(fast_c[1:])
    for _ in range(args.rounds - 1):
        for k, fn in (("a", lambda: run_bits_per_dim(problem, key, {})),
                      ("b", lambda: run_bits_per_dim(problem, key, best))):
            c0 = time.process_time()
            t = fn()[2]
            rows[k]["time"] = min(rows[k]["time"], t)
            rows[k]["cpu"] = min(rows[k]["cpu"], time.process_time() - c0)
        _, _, t, _, cpu = paper_method(problem, x, probes, c_batch, log)
        rows[fast_c]["time"], rows[fast_c]["cpu"] = (min(rows[fast_c]["time"], t),
                                                     min(rows[fast_c]["cpu"], cpu))
        w, c = eval_cost(problem, slots)
        rows["d"]["time"] = min(rows["d"]["time"], per_example * w)
        rows["d"]["cpu"] = min(rows["d"]["cpu"], per_example * c)
    # (b) and the engine on the replicated inputs must agree (checks probflow_draws).
    check = run_engine(problem, x[:nref], probes[:nref], solver=args.best_solver,
                       tol=args.best_tol, time_=args.best_time, slots=slots)[0]
    agree = float(np.abs(check - bpd_b[:nref]).max())
    # Against the faster of (c)'s batch sizes; from wall times and from CPU times.
    ratios = {}
    for unit, suffix in (("time", ""), ("cpu", " (CPU)")):
        tc = min(r[unit] for k, r in rows.items() if k.startswith("c"))
        ratios[f"c/b{suffix}"] = tc / rows["b"][unit]
        ratios[f"c/a{suffix}"] = tc / rows["a"][unit]
        ratios[f"b/d{suffix}"] = rows["b"][unit] / rows["d"][unit]
    return dict(problem=problem.name, n=n, nref=nref, rows=rows, ratios=ratios,
                draws_agreement=agree, notes=problem.notes,
                reference_self_check=ref_check), (x, probes)


def print_table(res, log):
    log(f"\n{res['problem']}: {res['n']} images; bias against the float64 reference on the "
        f"first {res['nref']} (same dequantization and probes)")
    cols = ("method", "setting", "NFE mean/max", "wall (s)", "CPU (s)", "compile (s)",
            "mean bpd", "std. error", "bias (± se)", "mean |err|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"].values():
        if "mean" not in r:
            lines.append(f"| {r['label']} | {r['setting']} | {r['nfe_mean']:.1f} | "
                         f"{r['time']:.2f} | {r['cpu']:.2f} | - | - | - | - | - |")
            continue
        nfe = (f"{r['nfe_mean']:.0f} (batched)" if r.get("batched")
               else f"{r['nfe_mean']:.1f} / {r['nfe_max']}")
        lines.append(
            f"| {r['label']} | {r['setting']} | {nfe} | {r['time']:.2f} | {r['cpu']:.2f} | "
            f"{r['compile']:.1f} | "
            f"{r['mean']:.4f} | {r['se']:.4f} | {r['bias']:+.1e} (± {r['bias_se']:.0e}) | "
            f"{r['mean_abs_err']:.1e} |"
        )
    log("\n".join(lines))
    q = res["ratios"]
    for suffix in ("", " (CPU)"):
        log(f"ratios{suffix or ' (wall)'}, against the faster (c): (c)/(b) = "
            f"{q['c/b' + suffix]:.2f}x (target >= 5), (c)/(a) = {q['c/a' + suffix]:.2f}x "
            f"(target >= 3), (b)/(d) = {q['b/d' + suffix]:.2f} (target <= 1.2)")
    log(f"check: (b) and the engine on the replicated draws agree to {res['draws_agreement']:.1e}"
        f" bits/dim; reference 1e-6 vs 1e-7: {res['reference_self_check']:.1e}")


# --------------------------------------------------------------------------- the sweep


def sweep_settings(quick, small=False):
    """(name, solver, clock, tolerances, steps) of the work-precision sweep; `small`: fewer
    settings (for the 28x28 problem, where each solve costs 10x more)."""
    if quick:
        tols, solvers, dpm_tols, dpm_steps = [1e-2, 1e-3], (diffrax.Tsit5(),), [1e-3], [20]
    elif small:
        tols, solvers = [1e-3, 3e-4, 1e-4, 1e-5], (diffrax.Tsit5(), diffrax.Dopri5())
        dpm_tols, dpm_steps = [1e-3], [40, 80]
    else:
        tols = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5]
        solvers = (diffrax.Tsit5(), diffrax.Dopri5(), diffrax.Bosh3())
        dpm_tols, dpm_steps = [1e-2, 1e-3, 1e-4], [20, 40, 80, 160]
    out = []
    for solver in solvers:
        for clock in ("t", "sqrt_t"):
            out.append((type(solver).__name__, solver, clock, tols, None))
    out.append(("DPMSolver(3)", pf.DPMSolver(order=3), "t", dpm_tols, None))
    for steps in dpm_steps:
        out.append(("DPMSolverMultistep(3)", pf.DPMSolverMultistep(order=3), "t", [None], steps))
    return out


def run_sweep(problem, x, probes, ref_bpd, slots, quick, log):
    rows = []
    for name, solver, clock, tols, steps in sweep_settings(quick, problem.name == "mnist"):
        first = None
        for tol in tols:
            bpd, nfe, t = run_engine(problem, x, probes, solver=solver, tol=tol, time_=clock,
                                     slots=slots, steps=steps)
            if first is None:  # the first run compiles: run it again for its time
                first = t
                bpd, nfe, t = run_engine(problem, x, probes, solver=solver, tol=tol,
                                         time_=clock, slots=slots, steps=steps)
            err = bpd - ref_bpd
            rows.append(dict(solver=name, clock=clock, tol=tol, steps=steps, time=t,
                             nfe_mean=float(nfe.mean()), nfe_max=int(nfe.max()),
                             bias=float(err.mean()), mean_abs_err=float(np.abs(err).mean()),
                             compile=max(first - t, 0.0)))
            r = rows[-1]
            setting = f"{steps} steps" if steps else f"tol {tol:g}"
            log(f"  {name:22s} {clock:6s} {setting:10s} NFE {r['nfe_mean']:6.1f} / "
                f"{r['nfe_max']:4d}  {t:7.2f} s  bias {r['bias']:+.1e}  mean|err| "
                f"{r['mean_abs_err']:.1e}")
    return rows


def plot_sweep(sweeps, path, paper_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4.2 * len(sweeps)), squeeze=False)
    markers = {"Tsit5": "o", "Dopri5": "s", "Bosh3": "^", "DPMSolver(3)": "D",
               "DPMSolverMultistep(3)": "x"}
    for row, (pname, rows) in zip(axes, sweeps.items(), strict=True):
        groups = {}
        for r in rows:
            groups.setdefault((r["solver"], r["clock"]), []).append(r)
        for (solver, clock), rs in groups.items():
            label = f"{solver}, {'sqrt(t)' if clock == 'sqrt_t' else 't'}"
            ls = "--" if clock == "sqrt_t" else "-"
            for ax, xkey in zip(row, ("time", "nfe_mean"), strict=True):
                ax.plot([r[xkey] for r in rs], [r["mean_abs_err"] for r in rs],
                        ls, marker=markers.get(solver, "."), label=label)
        if pname in paper_rows:
            p = paper_rows[pname]
            for ax, xkey in zip(row, ("time", "nfe_mean"), strict=True):
                ax.plot([p[xkey]], [p["mean_abs_err"]], "k*", ms=14,
                        label="paper's design (scipy RK45 1e-5)")
        for ax, xlabel in zip(row, ("wall time on the reference images (s)",
                                    "mean NFE per image"), strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(1e-3, color="grey", lw=0.8, ls=":")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean |error| per image (bits/dim)")
            ax.set_title(pname)
            ax.grid(True, which="both", alpha=0.3)
        row[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="JAX platform; everything of probflow's runs on it with no host round "
                        "trip per evaluation")
    p.add_argument("--data", default="digits,mnist", help="comma-separated: digits, mnist")
    p.add_argument("--limit", type=int, default=None,
                   help="test images per data set (default: digits 300 = all, mnist 200)")
    p.add_argument("--ref", type=int, default=None,
                   help="images re-solved in float64 (default: digits 64, mnist 16)")
    p.add_argument("--slots", type=int, default=None,
                   help="probflow's slots for (b) (default: bits_per_dim's slots='auto', by "
                        "example size on cpu, 1024 on gpu)")
    p.add_argument("--best-solver", dest="best_solver_name", choices=sorted(SOLVERS),
                   default="Dopri5", help="(b)'s solver")
    p.add_argument("--best-tol", type=float, default=3e-4, help="(b)'s rtol = atol")
    p.add_argument("--best-time", choices=("t", "sqrt_t", "log_snr"), default="sqrt_t",
                   help="(b)'s clock")
    p.add_argument("--paper-batches", default="1024,32",
                   help="(c)'s batch sizes, one joint solve per batch: the paper's "
                        "evaluate.batch_size and the issue's 32; ratios use the faster")
    p.add_argument("--rounds", type=int, default=2,
                   help="timing rounds of (a)-(d), interleaved; each method's fastest is kept")
    p.add_argument("--train-steps", type=int, default=1500,
                   help="mnist U-Net training steps (1500: 27 min on 2 busy cores, cached; 300 "
                        "steps gave a model worse than per-pixel categoricals)")
    p.add_argument("--figure", action="store_true", help="also run the work-precision sweep")
    p.add_argument("--figure-data", default="digits", help="data sets of the sweep")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 32 digits / 16 mnist images, reference 8, short sweep")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "likelihood_real",
                   help="cache folder (mnist model, references)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--_reference", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
    if args._reference:
        _reference_main(*args._reference)
        return
    platform = jax.devices()[0].platform
    if (args.device == "gpu") != (platform == "gpu"):
        raise SystemExit(f"--device {args.device} asked for, but JAX runs on {platform}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.paper_batches = [int(b) for b in args.paper_batches.split(",") if b.strip()]
    args.best_solver = SOLVERS[args.best_solver_name]
    args.best_options = dict(solver=args.best_solver, rtol=args.best_tol, atol=args.best_tol,
                             time=args.best_time)
    args.best_label = (f"{args.best_solver_name}, {args.best_time} time, rtol = atol = "
                       f"{args.best_tol:g}")
    log = lambda s: print(s, flush=True)
    load0 = os.getloadavg()
    log(f"likelihood on real networks: {platform}, {os.cpu_count()} CPU(s), load average "
        f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} (1/5/15 min)")
    names = [s.strip() for s in args.data.split(",") if s.strip()]
    results, sweeps, paper_points = [], {}, {}
    for name in names:
        if name == "digits":
            limit = args.limit or (32 if args.quick else 300)
            nref = args.ref or (8 if args.quick else 64)
            problem = digits_problem(limit)
        elif name == "mnist":
            limit = args.limit or (16 if args.quick else 200)
            nref = args.ref or (8 if args.quick else 16)
            problem = mnist_problem(limit, args.out, args.train_steps, log)
        else:
            raise SystemExit(f"--data: unknown data set {name!r} (digits, mnist)")
        res, (x, probes) = evaluate_problem(problem, args, nref, log)
        print_table(res, log)
        results.append(res)
        if args.figure and name in args.figure_data.split(","):
            nr = res["nref"]
            ref_bpd, _, _ = reference(problem, x[:nr], probes[:nr], args.out, args.device, log)
            log(f"\n  work-precision sweep on {nr} {name} images:")
            slots_sweep = min(args.slots or default_slots(problem.x_int[0].size), nr)
            sweeps[name] = run_sweep(problem, x[:nr], probes[:nr], ref_bpd, slots_sweep,
                                     args.quick, log)
            # The paper's design on the same images, for the figure.
            bpd, nfe, t, _, _ = paper_method(problem, x[:nr], probes[:nr], nr, log)
            paper_points[name] = dict(time=t, nfe_mean=float(nfe.mean()),
                                      bias=float((bpd - ref_bpd).mean()),
                                      mean_abs_err=float(np.abs(bpd - ref_bpd).mean()))
    if sweeps:
        path = ROOT / "docs" / "img" / "likelihood-work-precision.png"
        plot_sweep(sweeps, path, paper_points)
        log(f"\nwrote {path}")
    load1 = os.getloadavg()
    log(f"load average at the end: {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, sweeps=sweeps, paper_points=paper_points,
                           load_average=dict(start=load0, end=load1), device=platform,
                           jax=jax.__version__), f, indent=2, default=float)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
