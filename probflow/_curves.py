"""NFE-versus-quality curves: how much accuracy each sampler buys per score evaluation.

Three quality measures, each against an independent reference:

- solver error (probability-flow ODE only): the relative L2 distance of each sample from a
  tight-tolerance reference solve started from the same latent;
- distribution quality: the sliced Wasserstein distance to held-out data and, given a classifier,
  the Frechet distance in its feature space (an FID analogue);
- likelihood error: |bpd - bpd of a tight-tolerance solve| with the same dequantization and probes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ._classifier import AbstractClassifier
from ._flow import decode
from ._likelihood import bits_per_dim
from ._metrics import frechet_distance, sliced_wasserstein
from ._pc import LangevinCorrector, ReverseDiffusionPredictor
from ._reverse_sde import sample_pc, sample_sde
from ._sde import AbstractSDE
from ._time import AbstractStepSchedule, as_schedule
from ._tune import tune_schedule
from ._validate import check_positive_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ODESweep:
    """One ODE solver swept over tolerances (adaptive) or step counts (fixed steps).

    `schedule` lays the steps of the fixed-step settings: one schedule (or its name) for every
    step count, or a tuple with one per step count (a `TunedSchedule` is tuned for one N);
    None: the solve's default.
    """

    label: str
    solver: diffrax.AbstractSolver
    tolerances: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()
    schedule: Any = None

    def __post_init__(self):
        if bool(self.tolerances) == bool(self.steps):
            raise ValueError(f"ODESweep {self.label!r}: give exactly one of tolerances or steps")
        if self.schedule is None:
            return
        if self.tolerances:
            raise ValueError(f"ODESweep {self.label!r}: schedule= needs steps, not tolerances")
        if isinstance(self.schedule, tuple):
            if len(self.schedule) != len(self.steps):
                raise ValueError(
                    f"ODESweep {self.label!r}: schedule must have one schedule per step count "
                    f"({len(self.steps)}), got {len(self.schedule)}"
                )
            normal = tuple(as_schedule(s) for s in self.schedule)
        else:
            normal = as_schedule(self.schedule)
        object.__setattr__(self, "schedule", normal)

    def schedule_for(self, index: int) -> AbstractStepSchedule | None:
        """The schedule of the `index`-th step count."""
        return self.schedule[index] if isinstance(self.schedule, tuple) else self.schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class StochasticSweep:
    """A stochastic sampler swept over step counts: `kind` is "sde" (Euler-Maruyama on the
    reverse SDE) or "pc" (reverse diffusion + one Langevin corrector step)."""

    label: str
    kind: str
    steps: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in ("sde", "pc"):
            raise ValueError(f"kind must be 'sde' or 'pc', got {self.kind!r}")


def tune_sweep(
    model: Callable,
    sde: AbstractSDE,
    sweep: ODESweep,
    *,
    key: PRNGKeyArray,
    label: str | None = None,
    progress: Callable[[str], None] | None = None,
    **tune_options,
) -> ODESweep:
    """A copy of a fixed-step `sweep` on schedules tuned by `tune_schedule`, one per step count
    (starting from the sweep's own schedule), for `nfe_curve`.

    **Arguments:**

    - `model`, `sde`: the score model and its SDE.
    - `sweep`: an `ODESweep` with `steps`.
    - `key`: draws the calibration latents; pass a key other than the curve's, so that the
      curve measures latents the schedules were not tuned on.
    - `label`: the new sweep's label (default `sweep.label + "+tuned"`).
    - `progress`: called with a message before each tuning.
    - `tune_options`: passed to `tune_schedule` (`shape`, `eps`, `num_latents`, ...).
    """
    if not sweep.steps:
        raise ValueError(f"tune_sweep: sweep {sweep.label!r} has no step counts to tune")
    schedules = []
    for i, (n, k) in enumerate(zip(sweep.steps, jax.random.split(key, len(sweep.steps)))):
        if progress is not None:
            progress(f"tuning {sweep.label} steps={n}")
        init = sweep.schedule_for(i)
        schedules.append(tune_schedule(model, sde, sweep.solver, n, key=k, init=init,
                                       **tune_options))
    return ODESweep(label=f"{sweep.label}+tuned" if label is None else label,
                    solver=sweep.solver, steps=sweep.steps, schedule=tuple(schedules))


def default_ode_sweeps(quick: bool = False) -> list[ODESweep]:
    """Euler, Midpoint and Heun over step counts; Bosh3, Tsit5, Dopri5, Dopri8 over tolerances."""
    steps = (5, 10, 20) if quick else (5, 10, 20, 50, 100)
    tols = (1e-1, 1e-2, 1e-3) if quick else (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    return [
        ODESweep(label="euler", solver=diffrax.Euler(), steps=steps),
        ODESweep(label="midpoint", solver=diffrax.Midpoint(), steps=steps),
        ODESweep(label="heun", solver=diffrax.Heun(), steps=steps),
        ODESweep(label="bosh3", solver=diffrax.Bosh3(), tolerances=tols),
        ODESweep(label="tsit5", solver=diffrax.Tsit5(), tolerances=tols),
        ODESweep(label="dopri5", solver=diffrax.Dopri5(), tolerances=tols),
        ODESweep(label="dopri8", solver=diffrax.Dopri8(), tolerances=tols),
    ]


def default_stochastic_sweeps(quick: bool = False) -> list[StochasticSweep]:
    steps = (20, 50) if quick else (20, 50, 100, 250, 500)
    return [
        StochasticSweep(label="reverse-sde", kind="sde", steps=steps),
        StochasticSweep(label="pc", kind="pc", steps=steps),
    ]


def _flat(x: Array) -> Array:
    return jnp.reshape(x, (x.shape[0], -1))


def _quality(samples, reference_data, classifier, key) -> dict:
    out = {}
    if reference_data is not None:
        out["sliced_wasserstein"] = float(
            sliced_wasserstein(_flat(samples), _flat(reference_data), key=key)
        )
    if classifier is not None:
        feats = jax.jit(jax.vmap(lambda xi: classifier.features(0.0, xi)))
        out["frechet"] = frechet_distance(feats(samples), feats(reference_data))
    return out


def nfe_curve(
    model: Callable,
    sde: AbstractSDE,
    shape: tuple[int, ...],
    *,
    key: PRNGKeyArray,
    num_samples: int = 256,
    ode_sweeps: Sequence[ODESweep] | None = None,
    stochastic_sweeps: Sequence[StochasticSweep] | None = None,
    reference_data: Array | np.ndarray | None = None,
    classifier: AbstractClassifier | None = None,
    eps: float = 1e-3,
    reference_tol: float = 1e-7,
    reference_solver: diffrax.AbstractSolver | None = None,
    clip: tuple[float, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows {sampler, setting, nfe_mean, nfe_max, solver_error, sliced_wasserstein, frechet,
    seconds_incl_compile}: one per sampler and tolerance or step count.

    All ODE rows decode the same latents, so their `solver_error` is measured against one
    solve at rtol = atol = `reference_tol` from those latents, by `reference_solver` (default
    Dopri8; an adaptive solver that is also swept shares that sweep's compilation).
    `reference_data` (model space, [M, *shape]) is the held-out data for the distribution
    measures; `clip` clips samples to the data range before they are compared with data (not for
    the solver error).

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `shape`: the shape of one example.
    - `key`: the PRNG key of the latents and the samplers' noise.
    - `num_samples`: samples per setting.
    - `ode_sweeps`: the `ODESweep`s (None: the default sweeps).
    - `stochastic_sweeps`: the `StochasticSweep`s of the reverse-SDE and PC samplers (None: the
      default sweeps).
    - `reference_data`: held-out data [M, *shape] in model space for the distribution measures
      (None: none).
    - `classifier`: a clean-data classifier whose features give the Frechet distance (None: none).
    - `eps`: the smallest time of every sampler.
    - `reference_tol`: rtol = atol of the reference ODE solve.
    - `reference_solver`: the reference solver (None: `diffrax.Dopri8()`).
    - `clip`: (lo, hi) to clip samples to before comparing them with data (None: no clipping).
    - `progress`: called with a line of text after each setting (None: silent).
    """
    num_samples = check_positive_int(num_samples, "num_samples")
    ode_sweeps = default_ode_sweeps() if ode_sweeps is None else list(ode_sweeps)
    stochastic_sweeps = (
        default_stochastic_sweeps() if stochastic_sweeps is None else list(stochastic_sweeps)
    )
    if classifier is not None and reference_data is None:
        raise ValueError("classifier needs reference_data: the Frechet distance compares features")
    k_z, k_metric, k_sde = jax.random.split(key, 3)
    z = jax.vmap(lambda k: sde.prior_sample(k, tuple(shape)))(jax.random.split(k_z, num_samples))
    ref_solver = diffrax.Dopri8() if reference_solver is None else reference_solver
    ref = decode(
        model, sde, z, eps=eps, solver=ref_solver, rtol=reference_tol, atol=reference_tol
    ).x
    ref_norm = jnp.linalg.norm(_flat(ref), axis=1)
    postprocess = (lambda x: jnp.clip(x, *clip)) if clip is not None else (lambda x: x)
    rows = [
        {"sampler": f"reference ({type(ref_solver).__name__.lower()})",
         "setting": f"tol={reference_tol:g}", "nfe_mean": None,
         "nfe_max": None, "solver_error": 0.0, "seconds_incl_compile": None,
         **_quality(postprocess(ref), reference_data, classifier, k_metric)}
    ]
    for sweep in ode_sweeps:
        settings = [("steps", n) for n in sweep.steps] + [("tol", t) for t in sweep.tolerances]
        for i, (kind, value) in enumerate(settings):
            if progress is not None:
                progress(f"{sweep.label} {kind}={value}")
            opts: dict[str, Any] = (
                dict(steps=value, schedule=sweep.schedule_for(i)) if kind == "steps"
                else dict(rtol=value, atol=value)
            )
            start = time.perf_counter()
            r = decode(model, sde, z, eps=eps, solver=sweep.solver, **opts)
            jax.block_until_ready(r.x)
            seconds = time.perf_counter() - start
            err = jnp.linalg.norm(_flat(r.x - ref), axis=1) / ref_norm
            rows.append({
                "sampler": f"ode-{sweep.label}", "setting": f"{kind}={value:g}",
                "nfe_mean": float(r.nfe.mean()), "nfe_max": int(r.nfe.max()),
                "solver_error": float(err.mean()), "seconds_incl_compile": seconds,
                **_quality(postprocess(r.x), reference_data, classifier, k_metric),
            })
    for sweep in stochastic_sweeps:
        for n in sweep.steps:
            if progress is not None:
                progress(f"{sweep.label} steps={n}")
            start = time.perf_counter()
            if sweep.kind == "sde":
                r = sample_sde(model, sde, num_samples, tuple(shape), key=k_sde, steps=n, eps=eps)
            else:
                r = sample_pc(
                    model, sde, num_samples, tuple(shape), key=k_sde, steps=n, eps=eps,
                    predictor=ReverseDiffusionPredictor(),
                    corrector=LangevinCorrector(snr=0.16, steps=1),
                )
            jax.block_until_ready(r.x)
            seconds = time.perf_counter() - start
            rows.append({
                "sampler": sweep.label, "setting": f"steps={n}",
                "nfe_mean": float(r.nfe.mean()), "nfe_max": int(r.nfe.max()),
                "solver_error": None, "seconds_incl_compile": seconds,
                **_quality(postprocess(r.x), reference_data, classifier, k_metric),
            })
    return rows


def likelihood_curve(
    model: Callable,
    sde: AbstractSDE,
    x_int: Array | np.ndarray,
    *,
    key: PRNGKeyArray,
    num_bins: int,
    data_range: tuple[float, float] = (0.0, 1.0),
    sweeps: Sequence[ODESweep] | None = None,
    reference_tol: float = 1e-7,
    reference_solver: diffrax.AbstractSolver | None = None,
    trace: str = "rademacher",
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows {sampler, setting, nfe_mean, nfe_max, bpd, bpd_error}: |bpd - reference bpd| per
    solver setting; the reference is `reference_solver` (default Dopri8) at `reference_tol` with
    the same key (so the same dequantization noise and Hutchinson probes, of kind `trace`).

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `x_int`: integer images [N, ...].
    - `key`: the PRNG key (the same dequantization noise and probes for every setting).
    - `num_bins`: the number of levels of the images.
    - `data_range`: the model's data range.
    - `sweeps`: the `ODESweep`s to run (None: the default sweeps).
    - `reference_tol`: rtol = atol of the reference solve.
    - `reference_solver`: the reference solver (None: `diffrax.Dopri8()`).
    - `trace`: the divergence estimator, as in `log_likelihood`.
    - `progress`: called with a line of text after each setting (None: silent).
    """
    if sweeps is None:
        sweeps = [
            ODESweep(label="tsit5", solver=diffrax.Tsit5(), tolerances=(1e-2, 1e-3, 1e-4, 1e-5)),
            ODESweep(label="dopri5", solver=diffrax.Dopri5(), tolerances=(1e-3, 1e-4, 1e-5)),
            ODESweep(label="heun", solver=diffrax.Heun(), steps=(20, 50, 100)),
        ]
    common: dict[str, Any] = dict(key=key, num_bins=num_bins, data_range=data_range, trace=trace)
    ref_solver = diffrax.Dopri8() if reference_solver is None else reference_solver
    ref = bits_per_dim(
        model, sde, x_int, solver=ref_solver, rtol=reference_tol, atol=reference_tol, **common,
    )
    rows = [{"sampler": f"reference ({type(ref_solver).__name__.lower()})",
             "setting": f"tol={reference_tol:g}",
             "nfe_mean": float(ref.nfe.mean()), "nfe_max": int(ref.nfe.max()),
             "bpd": float(ref.bpd.mean()), "bpd_error": 0.0}]
    for sweep in sweeps:
        settings = [("steps", n) for n in sweep.steps] + [("tol", t) for t in sweep.tolerances]
        for kind, value in settings:
            if progress is not None:
                progress(f"likelihood {sweep.label} {kind}={value}")
            opts: dict[str, Any] = (
                dict(steps=value) if kind == "steps" else dict(rtol=value, atol=value)
            )
            r = bits_per_dim(model, sde, x_int, solver=sweep.solver, **opts, **common)
            rows.append({
                "sampler": f"ode-{sweep.label}", "setting": f"{kind}={value:g}",
                "nfe_mean": float(r.nfe.mean()), "nfe_max": int(r.nfe.max()),
                "bpd": float(r.bpd.mean()),
                "bpd_error": float(jnp.mean(jnp.abs(r.bpd - ref.bpd))),
            })
    return rows


def plot_nfe_curve(rows: list[dict], path, *, likelihood_rows: list[dict] | None = None,
                   title: str = "") -> None:
    """A PNG: each quality measure against NFE (log scale), one line per sampler.

    **Arguments:**

    - `rows`: `nfe_curve`'s rows.
    - `path`: the PNG file to write.
    - `likelihood_rows`: `likelihood_curve`'s rows, plotted as one more panel (None: none).
    - `title`: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [m for m in ("solver_error", "sliced_wasserstein", "frechet")
                if any(r.get(m) is not None for r in rows if r["nfe_mean"] is not None)]
    panels = measures + (["bpd_error"] if likelihood_rows else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, measure in zip(axes[0], panels):
        source = likelihood_rows if measure == "bpd_error" else rows
        groups: dict[str, list] = {}
        for r in source or []:
            if r["nfe_mean"] is None or r.get(measure) is None or r["sampler"].startswith("ref"):
                continue
            groups.setdefault(r["sampler"], []).append((r["nfe_mean"], r[measure]))
        for name, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], "o-", ms=3, label=name)
        ax.set_xscale("log")
        if measure in ("solver_error", "bpd_error"):
            ax.set_yscale("log")
        ax.set_xlabel("NFE per example")
        ax.set_ylabel(measure.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_rows(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain-text table of `rows` with the given columns (None shows as '-')."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths))
    out = [line(columns), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def save_image_grid(path, images, *, data_range=(0.0, 1.0), ncol: int | None = None,
                    scale: int = 4) -> None:
    """Write a batch of images [N, H, W, C] (model space) as one PNG grid.

    **Arguments:**

    - `path`: the PNG file to write.
    - `images`: a batch [N, H, W, C] in model space.
    - `data_range`: the model's data range, mapped to [0, 255].
    - `ncol`: images per row (None: about sqrt(N)).
    - `scale`: pixels per image pixel.
    """
    from PIL import Image

    x = np.asarray(images, np.float64)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, 1 or 3], got {x.shape}")
    lo, hi = data_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    n, h, w, c = x.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    pad = 1
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c))
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    img = (grid * 255).round().astype(np.uint8)
    img = img[..., 0] if c == 1 else img
    pil = Image.fromarray(img)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    pil.save(path)
