"""Probe noise of every trace estimator on the shipped digits-vp model, and the test-set error bars.

    python benchmarks/probe_noise.py                 # the estimator table (8 images, 16 probes)
    python benchmarks/probe_noise.py --test-set      # + the whole test set with the default

Table: 8 digits test images (17 bins, one dequantization shared by all estimators), 16 probes
each, Tsit5 at rtol = atol = 1e-4. "probe noise" is the std over probes of one probe's bits/dim,
pooled over the images (RMS of the per-image stds); "mean - exact" is the mean over probes and
images minus the exact-trace value on the same dequantized images, with its standard error. The
last row is the spread of the exact bits/dim between the images, for scale.

The estimators: probflow's `RademacherTrace`, `GaussianTrace` (Hutchinson on the whole drift,
as the paper's code) and `GaussianTrace` with a `GaussianControlVariate` fitted to dequantized
training images; for comparison, defined here, the old split-drift Gaussian estimator (the
linear drift part exact, only div score estimated: probflow's default before) and a
full-covariance Gaussian control variate (for Gaussian and Rademacher probes).

`--test-set`: the digits test set (300 images, or `--test-images N`) under the default estimator
(Rademacher) at the default tolerance (`--test-tol`), `--test-probes` probes and `--repeats`
fresh dequantizations, summarised by `pf.summarize_bits_per_dim`.
"""

from __future__ import annotations

import argparse
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import probflow as pf

NUM_BINS = 17


class SplitDriftGaussianTrace(pf.AbstractTraceEstimator):
    """probflow's old default: div F = D f - 1/2 g^2 v^T (ds/dx) v, Gaussian v."""

    num_probes: int = eqx.field(static=True)

    def draw(self, key, shape, dtype):
        return jax.random.normal(key, (self.num_probes,) + tuple(shape), dtype)

    def divergence(self, sde, t, x, probes, forms):
        score, quad = forms(probes)
        return score, sde.drift_coef(t) * x.size - 0.5 * sde.diffusion(t) ** 2 * quad


class FullCovarianceTrace(pf.AbstractTraceEstimator):
    """Hutchinson minus the score of p_t for Gaussian data N(mu, Sigma), Sigma = U diag(lam) U^T:
    its Jacobian -U diag(1 / (m^2 lam + std^2)) U^T has an exact trace, and U^T v is computed once
    per probe, so the control variate costs O(D) per evaluation."""

    num_probes: int = eqx.field(static=True)
    rademacher: bool = eqx.field(static=True)
    eigenvalues: jax.Array
    eigenvectors: jax.Array

    def draw(self, key, shape, dtype):
        shape = (self.num_probes,) + tuple(shape)
        if self.rademacher:
            v = jax.random.rademacher(key, shape, dtype)
        else:
            v = jax.random.normal(key, shape, dtype)
        return v, v.reshape(self.num_probes, -1) @ self.eigenvectors

    def divergence(self, sde, t, x, probes, forms):
        v, w = probes
        score, quad = forms(v)
        m, std = sde.marginal(t)
        c = -1.0 / (m * m * self.eigenvalues + std * std)
        rest = quad - jnp.sum((w * w - 1.0) * c, axis=-1)
        return score, sde.drift_coef(t) * x.size - 0.5 * sde.diffusion(t) ** 2 * rest


def training_data(key):
    """Dequantized training images in model space (0, 1), for the control variates."""
    train = pf.data.load("digits", split="train")
    u = jax.random.uniform(key, train.images.shape)
    return (jnp.asarray(train.images) + u) / NUM_BINS


def estimator_table(model, sde, x_int, probes, key):
    x_train = training_data(jax.random.key(123))
    flat = np.asarray(x_train, np.float64).reshape(x_train.shape[0], -1)
    lam, vecs = np.linalg.eigh(np.cov(flat.T, bias=True))
    lam, vecs = jnp.asarray(np.maximum(lam, 0.0), jnp.float32), jnp.asarray(vecs, jnp.float32)
    cv = pf.GaussianControlVariate.fit(x_train)
    rows = [
        ("Gaussian, linear drift part exact (probflow's old default)",
         SplitDriftGaussianTrace(probes)),
        ("Gaussian, Hutchinson on the whole drift (the paper's code; trace='gaussian')",
         pf.GaussianTrace(probes)),
        ("Gaussian, diagonal Gaussian control variate (GaussianTrace(P, cv))",
         pf.GaussianTrace(probes, cv)),
        ("Gaussian, full-covariance Gaussian control variate",
         FullCovarianceTrace(probes, False, lam, vecs)),
        ("Rademacher (either way; the default)", pf.RademacherTrace(probes)),
        ("Rademacher, full-covariance Gaussian control variate",
         FullCovarianceTrace(probes, True, lam, vecs)),
    ]
    opts = dict(num_bins=NUM_BINS, rtol=1e-4, atol=1e-4)
    t0 = time.perf_counter()
    exact = pf.bits_per_dim(model, sde, x_int, key=key, trace="exact", **opts)
    exact_bpd = np.asarray(exact.bpd, np.float64)
    print(f"exact trace: {time.perf_counter() - t0:.1f} s, nfe mean {float(exact.nfe.mean()):.0f}",
          flush=True)
    out = []
    for name, est in rows:
        t0 = time.perf_counter()
        r = pf.bits_per_dim(model, sde, x_int, key=key, trace=est, **opts)  # same dequantization
        b = np.asarray(r.bpd_probes, np.float64)  # [N, P]
        noise = math.sqrt(np.mean(b.var(axis=1, ddof=1)))
        diff = b.mean(axis=1) - exact_bpd
        bias, bias_se = diff.mean(), noise / math.sqrt(b.size)
        secs = time.perf_counter() - t0
        out.append((name, noise, bias, bias_se, float(r.nfe.mean()), secs))
        print(f"{name}: {secs:.1f} s", flush=True)
    spread = float(exact_bpd.std(ddof=1))
    n = x_int.shape[0]
    print(f"\n{n} digits-vp test images, {probes} probes each, Tsit5 rtol=atol=1e-4 (bits/dim)\n")
    print("| estimator | probe noise per image | mean - exact (± SE) | NFE mean |")
    print("|---|---|---|---|")
    for name, noise, bias, se, nfe, _ in out:
        print(f"| {name} | {noise:.3f} | {bias:+.3f} ± {se:.3f} | {nfe:.0f} |")
    print(f"| spread of the exact bits/dim between images | {spread:.3f} | – | "
          f"{float(exact.nfe.mean()):.0f} |")
    print(f"\nexact mean {exact_bpd.mean():.4f} bits/dim")
    base = out[0][1]
    print("variance ratios vs the old default: " + ", ".join(
        f"{(base / o[1]) ** 2:.0f}x" for o in out[1:]))


def test_set(model, sde, images, probes, repeats, key, tol):
    t0 = time.perf_counter()
    results = []
    for k in jax.random.split(key, repeats):
        r = pf.bits_per_dim(model, sde, images, key=k, num_bins=NUM_BINS, num_probes=probes,
                            rtol=tol, atol=tol)
        jax.block_until_ready(r.bpd)
        results.append(r)
        print(f"repeat done: {time.perf_counter() - t0:.1f} s, nfe mean "
              f"{float(r.nfe.mean()):.1f}", flush=True)
    s = pf.summarize_bits_per_dim(results)
    print(f"\ndigits-vp test set, {s.num_images} images, default trace (Rademacher), "
          f"{probes} probes, {repeats} dequantizations, Tsit5 rtol=atol={tol:g}:")
    print(s)
    for k, v in s.as_dict().items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"  (a single-probe, single-dequantization estimate of one image has std "
          f"{math.sqrt(s.image_spread**2 + s.dequantization_noise**2 + s.probe_noise**2):.4f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="images for the estimator table")
    ap.add_argument("--probes", type=int, default=16, help="probes per image for the table")
    ap.add_argument("--test-set", action="store_true", help="also the test-set error bars")
    ap.add_argument("--test-images", type=int, default=300)
    ap.add_argument("--test-probes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--test-tol", type=float, default=1e-5, help="rtol = atol (default: 1e-5)")
    ap.add_argument("--skip-table", action="store_true")
    args = ap.parse_args()
    model, sde = pf.load_pretrained("digits-vp")
    test = pf.data.load("digits", split="test")
    if not args.skip_table:
        estimator_table(model, sde, jnp.asarray(test.images[: args.images]), args.probes,
                        jax.random.key(0))
    if args.test_set:
        test_set(model, sde, jnp.asarray(test.images[: args.test_images]), args.test_probes,
                 args.repeats, jax.random.key(1), args.test_tol)


if __name__ == "__main__":
    main()
