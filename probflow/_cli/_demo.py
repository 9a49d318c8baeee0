"""`probflow demo`: the main job on the shipped digits model, in under two minutes on 2 CPU cores.

The solves are laid out to share compiled functions: the ODE samples, the encode->decode round
trip and the NFE curve's Tsit5 rows and reference all decode batches of the same size at the
same eps with Tsit5 (the tolerances are arrays, so one compilation serves them all), and the
SDE and PC sample grids use step counts that the curve sweeps too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np

from .._options import BPD_TOL
from ._common import (
    CLIError,
    Command,
    add_checkpoint_option,
    format_rows,
    format_table,
    load_args_model,
    load_data,
    model_space,
    nonneg_int,
    out_path,
    positive_int,
    progress_bar,
    relative_error,
    write_json,
)
from ._curve import DEFAULT, SAMPLE_COLUMNS, CurveSettings, run_nfe_curve


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoPlan:
    num: int  # samples per grid, images encoded, samples per curve setting
    sde_steps: int  # the SDE grid's steps (the curve sweeps it too)
    pc_steps: int  # the PC grid's steps (the curve sweeps it too)
    bpd_images: int
    bpd_tol: float  # rtol = atol of the likelihood solves
    curve: CurveSettings

    def __post_init__(self):
        # The grids and the curve share compiled solves only with equal shapes and step counts.
        if self.curve.num_samples != self.num:
            raise ValueError("the curve must use the grids' number of samples")
        if not {self.sde_steps, self.pc_steps} <= set(self.curve.sde_steps):
            raise ValueError("the curve must sweep the SDE and PC grids' step counts")


PLAN = DemoPlan(
    num=64,
    sde_steps=100,
    pc_steps=100,
    bpd_images=300,
    # pf.bits_per_dim's default (Dopri5 in sqrt(t) time at 3e-4): its bias on this model is
    # 2e-4 bits/dim, 70x below the standard error over 300 images (docs/benchmarks.md).
    bpd_tol=BPD_TOL,
    # `probflow nfe-curve`'s default sweep on the grids' 64 samples; the stochastic samplers at
    # the grids' 100 steps only (each step count is a compilation of its own).
    curve=dataclasses.replace(DEFAULT, num_samples=64, sde_steps=(100,), likelihood_images=0),
)

#: `--quick`: a smoke run (for tests).
QUICK = DemoPlan(
    num=8,
    sde_steps=10,
    pc_steps=10,
    bpd_images=8,
    bpd_tol=BPD_TOL,
    curve=dataclasses.replace(DEFAULT, num_samples=8, solvers=("euler", "tsit5"),
                              tolerances=(1e-2,), ode_steps=(4,), sde_steps=(10,),
                              stochastic=("reverse-sde",), likelihood_images=0),
)


class _Stopwatch:
    """Wall-clock and CPU seconds of each section of the demo (the CPU time is what a busy,
    shared machine does not inflate)."""

    def __init__(self):
        self.sections: dict[str, dict] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.sections[name] = {"wall_s": time.perf_counter() - wall,
                               "cpu_s": time.process_time() - cpu}

    def wall(self, name: str) -> float:
        return round(self.sections[name]["wall_s"], 1)

    def total(self) -> dict:
        return {"wall_s": time.perf_counter() - self._wall,
                "cpu_s": time.process_time() - self._cpu}


def _add_demo(p) -> None:
    add_checkpoint_option(p)
    p.add_argument("--out", default="demo-out", help="output folder (created if missing)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds every draw")
    p.add_argument("--bpd-images", type=positive_int, default=PLAN.bpd_images, metavar="N",
                   help=f"test images for bits/dim ({PLAN.bpd_images} = the whole digits test "
                        "split; --quick: 8)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few images, samples and steps (for tests)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the summary to PATH (default: only OUT/summary.json)")


def _run_demo(args) -> int:
    import jax

    import probflow as pf

    out = out_path(args.out, None, folder=True)
    assert out is not None
    out_path(args.json, None, "--json")
    plan = QUICK if args.quick else dataclasses.replace(PLAN, bpd_images=args.bpd_images)
    clock = _Stopwatch()
    loaded = load_args_model(args)
    model, sde, data_range = loaded.model, loaded.sde, loaded.data_range
    test = load_data("digits", "test")
    if loaded.shape != tuple(test.shape) or loaded.num_bins not in (None, test.num_bins):
        raise CLIError(
            f"--checkpoint: the demo runs on the digits data (shape {tuple(test.shape)}, "
            f"{test.num_bins} bins), this model is for shape {loaded.shape} with "
            f"{loaded.num_bins} bins; run bpd, sample, encode or nfe-curve with --data instead"
        )
    key = jax.random.key(args.seed)
    summary: dict = {"checkpoint": args.checkpoint}
    table = []
    bar = progress_bar(6, "demo")

    # 1. Test-set bits/dim (uniform dequantization, bits_per_dim's solver at plan.bpd_tol,
    #    eps = 1e-5, one Rademacher probe per image).
    n_bpd = min(plan.bpd_images, len(test))
    with clock("bpd"):
        r = pf.bits_per_dim(model, sde, test.images[:n_bpd], key=jax.random.fold_in(key, 1),
                            num_bins=test.num_bins, data_range=data_range, trace="rademacher",
                            rtol=plan.bpd_tol, atol=plan.bpd_tol)
        stats = pf.summarize_bits_per_dim(jax.block_until_ready(r))
    summary["bpd"] = {"mean": stats.mean, "se": stats.sem, "images": n_bpd,
                      "trace": "rademacher", "probes": 1, "tol": plan.bpd_tol,
                      "summary": stats.as_dict(), "nfe_mean": float(np.mean(r.nfe)),
                      "nfe_max": int(np.max(r.nfe)), "seconds": clock.wall("bpd")}
    table.append([f"test bits/dim (± s.e., tol {plan.bpd_tol:g})",
                  f"{stats.mean:.4f} ± {stats.sem:.4f}",
                  f"{np.mean(r.nfe):.0f} / {np.max(r.nfe)}", clock.wall("bpd"), "-"])
    bar.update(1)

    # 2-4. Sample grids from the three samplers.
    num, shape = plan.num, loaded.shape
    samplers = [
        ("ODE samples (tsit5, tol 1e-3)", "samples_ode.png",
         lambda k: pf.sample_ode(model, sde, num, shape, key=k,
                                 options=pf.ODEOptions.sampling())),
        (f"SDE samples (Euler-Maruyama, {plan.sde_steps} steps)", "samples_sde.png",
         lambda k: pf.sample_sde(model, sde, num, shape, key=k, steps=plan.sde_steps)),
        (f"PC samples (RD + Langevin, {plan.pc_steps} steps)", "samples_pc.png",
         lambda k: pf.sample_pc(model, sde, num, shape, key=k, steps=plan.pc_steps,
                                predictor=pf.ReverseDiffusionPredictor(),
                                corrector=pf.LangevinCorrector(snr=0.16, steps=1))),
    ]
    summary["samples"] = {}
    for i, (name, fname, fn) in enumerate(samplers):
        with clock(fname):
            s = fn(jax.random.fold_in(key, 10 + i))
            x = np.asarray(jax.block_until_ready(s.x))
            pf.save_image_grid(out / fname, x[:64], data_range=data_range)
        summary["samples"][fname] = {"nfe_mean": float(np.mean(s.nfe)),
                                     "seconds": clock.wall(fname)}
        table.append([name, "-", f"{np.mean(s.nfe):.0f} / {np.max(s.nfe)}", clock.wall(fname),
                      str(out / fname)])
        bar.update(1)

    # 5. Encode -> decode round trip on test images (Tsit5 at the default 1e-5).
    with clock("encode_decode"):
        x = model_space(test, loaded, num)
        enc = pf.encode(model, sde, x)
        dec = pf.decode(model, sde, enc.z)
        err = relative_error(dec.x, x)
    pf.save_image_grid(out / "encode_decode.png", np.concatenate([x[:16], np.asarray(dec.x[:16])]),
                       data_range=data_range, ncol=16)
    summary["encode_decode"] = {"images": len(x), "rel_error_mean": float(err.mean()),
                                "rel_error_max": float(err.max()),
                                "nfe_encode_mean": float(np.mean(enc.nfe)),
                                "nfe_decode_mean": float(np.mean(dec.nfe))}
    table.append(["encode->decode rel. error", f"{err.mean():.1e} (max {err.max():.1e})",
                  f"{np.mean(enc.nfe):.0f} + {np.mean(dec.nfe):.0f}",
                  clock.wall("encode_decode"), str(out / "encode_decode.png")])
    bar.update(1)

    # 6. A compact NFE-versus-quality curve.
    with clock("nfe_curve"):
        rows, _ = run_nfe_curve(loaded, test, plan.curve, eps=1e-3, seed=args.seed,
                                classifier=pf.load_pretrained_classifier("digits-classifier"),
                                desc="demo: nfe-curve")
        pf.plot_nfe_curve(rows, out / "nfe_curve.png",
                          title=f"{args.checkpoint}: NFE vs quality")
    summary["nfe_curve"] = rows
    table.append(["NFE-vs-quality curve", f"{len(rows)} settings", "-",
                  clock.wall("nfe_curve"), str(out / "nfe_curve.png")])
    bar.update(1)
    bar.close()

    total = clock.total()
    summary["seconds_total"] = total["wall_s"]
    summary["cpu_seconds_total"] = total["cpu_s"]
    summary["timings"] = clock.sections
    write_json(str(out / "summary.json"), summary, "--out")
    write_json(args.json, summary)
    print(format_table(["result", "value", "NFE mean / max", "time (s)", "file"], table))
    print(f"\ntest bits/dim {stats}")
    print()
    print(format_rows(rows, [c for c in SAMPLE_COLUMNS if c != "nfe_max"]))
    print(f"\ntotal {total['wall_s']:.0f} s ({total['cpu_s']:.0f} s of CPU time); summary: "
          f"{out / 'summary.json'}")
    return 0


COMMANDS = (
    Command(
        name="demo",
        help="the main job on the shipped digits model (under 2 minutes on 2 CPU cores)",
        description="On the shipped digits-vp model: test-set bits/dim, sample grids from the "
                    "ODE, SDE and PC samplers, the encode->decode error and a compact "
                    "NFE-versus-quality curve. Writes PNGs and summary.json into --out and "
                    "prints a table.",
        add_arguments=_add_demo,
        run=_run_demo,
    ),
)
