"""Record tests/fixtures/fewstep_*.npz from the reference implementations of the few-step solvers.

UniPC: wl-zhao/UniPC (uni_pc.py, class UniPC, `sample(method="multistep")`). iPNDM and tAB-DEIS:
zju-pi/diff-sampler (diff-solvers-main/solvers.py, `ipndm_sampler`, `deis_sampler`, with the
coefficients of solver_utils.py's `get_deis_coeff_list`). Each is run in float64 on the exact
score of the 2-d Gaussian mixture of tests/test_fewstep.py under VPSDE(0.1, 20), from fixed
latents on fixed times; the fixtures hold the latents x_T, the times t (in the SDE's time), the
reference's result x at t = eps and its number of model evaluations.

The reference repositories are read from their git mirrors (fetched with the session's `fetch`
tool; pass --unipc / --diff-sampler to point elsewhere) into a temporary directory and imported
from there at recording time only; none of their code is part of probflow.

Notes on the runs:
* diff-sampler works in the VE variables x~ = x / alpha, sigma = std / alpha, with a denoiser
  D(x~; sigma); the mixture's is D = (x + std^2 score(t, x)) / alpha at x = alpha x~, t = t(sigma).
* Its DEIS maps sigma to a VP time by fitting beta_min, beta_d to (sigma_min, sigma_max) at
  t = (1e-3, 1) (`edm2t`, whose defaults are EDM's 0.002 / 80, a VP schedule with a negative
  beta_min). We set those defaults to VPSDE(0.1, 20)'s sigma at 1e-3 and 1, so the fit recovers
  beta = 0.1 .. 20 and DEIS's t is probflow's t.
* `get_deis_coeff_list` integrates the Lagrange basis by a Riemann sum with N points (error
  O(1/N)); we run it with N and 2N and record the Richardson extrapolation 2 C(2N) - C(N).

Run: python scripts/make_fewstep_fixtures.py   (torch, CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import probflow as pf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"
MIXTURE = dict(
    weights=[0.3, 0.7],
    means=[[-1.0, 0.5], [1.5, -0.5]],
    covs=[np.eye(2) * 0.3, [[0.5, 0.2], [0.2, 0.4]]],
)
EPS = 1e-3


def _checkout(git_dir: str, files: list[str], dest: Path) -> Path:
    for f in files:
        text = subprocess.run(
            ["git", "--git-dir", git_dir, "show", f"HEAD:{f}"],
            check=True, capture_output=True, text=True,
        ).stdout
        (dest / Path(f).name).write_text(text)
    return dest


def _commit(git_dir: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, "rev-parse", "HEAD"], check=True, capture_output=True,
        text=True,
    ).stdout.strip()


class Counter:
    """The mixture's exact model in torch float64, counting evaluations."""

    def __init__(self, sde):
        self.sde = sde
        self.score = jax.jit(jax.vmap(pf.GaussianMixture(**MIXTURE).score_model(sde),
                                      in_axes=(0, 0)))
        self.calls = 0

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction at (x, t) (t per example; x [B, 1, 1, 2] as UniPC wants images)."""
        self.calls += 1
        xs = jnp.asarray(x.detach().numpy()).reshape(x.shape[0], -1)
        ts = jnp.asarray(t.detach().numpy()).reshape(-1) * jnp.ones(xs.shape[0])
        _, std = self.sde.marginal(ts)
        out = -std[:, None] * self.score(ts, xs)
        return torch.from_numpy(np.array(out).reshape(x.shape))

    def denoiser(self, x_ve: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """EDM's D(x~; sigma) for diff-sampler."""
        self.calls += 1
        sigma = float(sigma)
        t = float(self.sde.time_of_log_snr(-np.log(sigma)))
        alpha, std = (float(v) for v in self.sde.marginal(jnp.asarray(t)))
        xs = jnp.asarray(x_ve.detach().numpy()) * alpha
        ts = jnp.full((xs.shape[0],), t)
        x0 = (xs + std**2 * self.score(ts, xs)) / alpha
        return torch.from_numpy(np.array(x0))


def record_unipc(git_dir: str, tmp: Path, z: np.ndarray) -> dict:
    _checkout(git_dir, ["uni_pc.py"], tmp)
    uni_pc = importlib.import_module("uni_pc")
    sde = pf.VPSDE()
    ns = uni_pc.NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)
    out = {}
    for order in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for prediction in ("data", "noise"):
                for skip, steps in (("time_quadratic", 6), ("logSNR", 8)):
                    counter = Counter(sde)
                    solver = uni_pc.UniPC(
                        counter.eps, ns, algorithm_type=f"{prediction}_prediction",
                        variant=variant,
                    )
                    ts = solver.get_time_steps(skip, 1.0, EPS, steps, "cpu")
                    x = solver.sample(
                        torch.from_numpy(z.reshape(-1, 1, 1, 2).copy()), steps=steps,
                        t_start=1.0, t_end=EPS, order=order,
                        skip_type=skip, method="multistep", lower_order_final=True,
                    )
                    name = f"unipc_{order}_{variant}_{prediction}_{skip}"
                    out[f"{name}_x"] = x.numpy().reshape(z.shape)
                    out[f"{name}_t"] = ts.numpy()
                    out[f"{name}_nfe"] = np.asarray(counter.calls)
    return out


def record_diff_sampler(git_dir: str, tmp: Path, z: np.ndarray) -> dict:
    _checkout(
        git_dir, ["diff-solvers-main/solvers.py", "diff-solvers-main/solver_utils.py"], tmp
    )
    solver_utils = importlib.import_module("solver_utils")
    solvers = importlib.import_module("solvers")
    sde = pf.VPSDE()
    sig = lambda t: float(np.exp(-float(sde.log_snr(jnp.asarray(t)))))  # noqa: E731
    sigma_min, sigma_max = sig(EPS), sig(1.0)
    solver_utils.edm2t.__defaults__ = (EPS, sigma_min, sigma_max)
    out = {}
    steps = 8
    # EDM's polynomial (rho = 7) schedule, num_steps = steps + 1 noise levels.
    sigmas = solver_utils.get_schedule(steps + 1, sigma_min, sigma_max, schedule_type="polynomial",
                                       schedule_rho=7)
    t_steps, _, _ = solver_utils.edm2t(sigmas)
    ts = t_steps.numpy()
    alpha_T = float(sde.marginal(jnp.asarray(1.0))[0])
    alpha_eps = float(sde.marginal(jnp.asarray(EPS))[0])
    latents = torch.from_numpy(z.copy()) / (alpha_T * sigma_max)  # x_T = alpha_T sigma_max latents
    # (max_order=1 fails in the reference's history update; order 1 is plain Euler in sigma.)
    for order in (2, 3, 4):
        counter = Counter(sde)
        x = solvers.ipndm_sampler(counter.denoiser, latents, num_steps=steps + 1,
                                  max_order=order, t_steps=sigmas)
        out[f"ipndm_{order}_x"] = alpha_eps * x.numpy()
        out[f"ipndm_{order}_nfe"] = np.asarray(counter.calls)
        c1 = solver_utils.get_deis_coeff_list(sigmas, order, N=100_000, deis_mode="tab")
        c2 = solver_utils.get_deis_coeff_list(sigmas, order, N=200_000, deis_mode="tab")
        coeffs = [[2 * b - a for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(c1, c2,
                                                                                    strict=True)]
        counter = Counter(sde)
        x = solvers.deis_sampler(counter.denoiser, latents, num_steps=steps + 1,
                                 max_order=order, coeff_list=coeffs, t_steps=sigmas)
        out[f"deis_{order}_x"] = alpha_eps * x.numpy()
        out[f"deis_{order}_nfe"] = np.asarray(counter.calls)
    out["diff_sampler_t"] = ts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unipc", default="/work/.mirror/wl-zhao+UniPC/repo")
    parser.add_argument("--diff-sampler", default="/work/.mirror/zju-pi+diff-sampler/repo")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    sde = pf.VPSDE()
    z = np.asarray(sde.prior_std() * jax.random.normal(jax.random.key(0), (4, 2), jnp.float64))
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sys.path.insert(0, str(tmp))
        unipc = record_unipc(args.unipc, tmp, z)
        np.savez(OUT / "fewstep_unipc.npz", z=z, commit=_commit(args.unipc), **unipc)
        ds = record_diff_sampler(args.diff_sampler, tmp, z)
        np.savez(OUT / "fewstep_diff_sampler.npz", z=z, commit=_commit(args.diff_sampler), **ds)
    print(f"wrote {OUT / 'fewstep_unipc.npz'} ({len(unipc)} arrays) and "
          f"{OUT / 'fewstep_diff_sampler.npz'} ({len(ds)} arrays)")


if __name__ == "__main__":
    main()
