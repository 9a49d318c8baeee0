"""`probflow nfe-curve`: NFE-versus-quality curves of the ODE, reverse-SDE and PC samplers."""

from __future__ import annotations

import dataclasses

import numpy as np

from ._common import (
    CLIError,
    Command,
    add_checkpoint_option,
    add_output_options,
    check_data_matches,
    digits_classifier_for,
    format_rows,
    load_args_model,
    load_data,
    make_solver,
    model_space,
    names,
    nonneg_int,
    out_path,
    positive_float,
    positive_floats,
    positive_int,
    positive_ints,
    progress_bar,
    write_json,
    writing,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CurveSettings:
    """What an NFE curve sweeps (the options of `probflow nfe-curve`)."""

    num_samples: int
    solvers: tuple[str, ...]
    tolerances: tuple[float, ...]
    ode_steps: tuple[int, ...]
    sde_steps: tuple[int, ...]
    stochastic: tuple[str, ...]  # of "reverse-sde", "pc"
    likelihood_images: int
    likelihood_solvers: tuple[str, ...]
    reference_solver: str
    reference_tol: float
    tune: bool = False  # add a tuned-schedule copy of every fixed-step solver
    schedule_files: tuple[str, ...] = ()  # tuned schedules (pf.save_schedule files) to add
    solver_files: tuple[str, ...] = ()  # tuned solvers (pf.save_solver files) to add


#: The default sweep: a few settings of each kind, about 5 minutes on 2 CPU cores.
DEFAULT = CurveSettings(
    num_samples=128,
    solvers=("euler", "dpm++2m", "tsit5"),
    tolerances=(1e-2, 1e-3, 1e-4),
    ode_steps=(10, 25),
    sde_steps=(25, 100),
    stochastic=("reverse-sde", "pc"),
    likelihood_images=8,
    likelihood_solvers=("tsit5",),
    reference_solver="tsit5",
    reference_tol=1e-6,
)

_ALL_SOLVERS = ("euler", "midpoint", "heun", "bosh3", "tsit5", "dopri5", "dopri8")

#: `--full`: every diffrax solver family, more settings, a Dopri8 reference at 1e-7.
FULL = CurveSettings(
    num_samples=256,
    solvers=_ALL_SOLVERS,
    tolerances=(1e-1, 1e-2, 1e-3, 1e-4),
    ode_steps=(5, 10, 20, 50, 100),
    sde_steps=(20, 50, 100, 250),
    stochastic=("reverse-sde", "pc"),
    likelihood_images=32,
    likelihood_solvers=_ALL_SOLVERS,
    reference_solver="dopri8",
    reference_tol=1e-7,
)


def _show(values) -> str:
    if isinstance(values, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "''"
    return f"{values:g}" if isinstance(values, float) else str(values)


def _default_help(field: str) -> str:
    return (f"(default: {_show(getattr(DEFAULT, field))}; with --full: "
            f"{_show(getattr(FULL, field))})")


def _add_nfe_curve(p) -> None:
    add_checkpoint_option(p)
    p.add_argument("--data", default="digits",
                   help="held-out data for the distribution measures (a probflow.data name)")
    p.add_argument("--split", default="test", help="the dataset split")
    p.add_argument("--full", action="store_true",
                   help="the full sweep (every option's --full value below); explicit options "
                        "still override it")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="samples per setting " + _default_help("num_samples"))
    p.add_argument("--solvers", type=names, default=None,
                   help="comma-separated ODE solvers " + _default_help("solvers"))
    p.add_argument("--tolerances", type=positive_floats, default=None,
                   help="rtol = atol of the adaptive solvers " + _default_help("tolerances"))
    p.add_argument("--ode-steps", "--step-counts", dest="ode_steps", type=positive_ints,
                   default=None, metavar="N,N,...",
                   help="step counts of the solvers without an error estimate and of the DPM "
                        "solvers " + _default_help("ode_steps"))
    p.add_argument("--sde-steps", type=positive_ints, default=None, metavar="N,N,...",
                   help="step counts (noise levels) of the reverse-SDE and PC samplers ('' to "
                        "skip them) " + _default_help("sde_steps"))
    p.add_argument("--likelihood-images", type=nonneg_int, default=None, metavar="N",
                   help="test images for the |bpd - reference| curve (0 to skip) "
                        + _default_help("likelihood_images"))
    p.add_argument("--likelihood-solvers", type=names, default=None,
                   help="the solvers of the likelihood curve (with the same settings) "
                        + _default_help("likelihood_solvers"))
    p.add_argument("--reference-solver", default=None, metavar="NAME",
                   help="the adaptive solver of the tight reference solves "
                        + _default_help("reference_solver"))
    p.add_argument("--reference-tol", type=positive_float, default=None,
                   help="rtol = atol of the reference solves " + _default_help("reference_tol"))
    p.add_argument("--tune", action="store_true", default=None,
                   help="also sweep every fixed-step solver on schedules tuned to the model "
                        "(pf.tune_schedule, one per step count, on latents the curve does not "
                        "use; default: off)")
    p.add_argument("--schedule-file", dest="schedule_files", action="append", default=None,
                   metavar="PATH",
                   help="a tuned schedule saved by pf.save_schedule: every fixed-step solver "
                        "whose step counts include its N also runs on it (repeatable; default: "
                        "none)")
    p.add_argument("--solver-file", dest="solver_files", action="append", default=None,
                   metavar="PATH",
                   help="a tuned solver saved by pf.save_solver (pf.tune_solver), swept at its "
                        "own step count (repeatable; default: none)")
    p.add_argument("--eps", type=positive_float, default=1e-3,
                   help="the time sampling stops at, 0 < eps < T")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the latents and noise")
    add_output_options(p, out="nfe_curve.png", out_help="the PNG plot")


def settings_from(args) -> CurveSettings:
    """The sweep: the explicit options over `DEFAULT` (or `FULL` with --full)."""
    base = FULL if args.full else DEFAULT
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CurveSettings)
             if getattr(args, f.name, None) is not None}
    for name in ("schedule_files", "solver_files"):
        if name in given:
            given[name] = tuple(given[name])
    return dataclasses.replace(base, **given)


def _check_tuned_eps(flag: str, path, sched, eps: float) -> None:
    """A one-line error if the tuned schedule `sched` (of the file at `path`) ends at another
    eps than the curve's."""
    if abs(sched.ts[-1] - eps) > 1e-6 * eps:
        raise CLIError(f"{flag}: {path} was tuned for eps={sched.ts[-1]:g}; pass "
                       f"--eps {sched.ts[-1]:g}")


def scheduled_sweeps(sweeps, files, *, eps: float):
    """For each tuned-schedule file, a copy of every fixed-step sweep that has its step count,
    run on that schedule only (labelled with the file's name)."""
    from pathlib import Path

    import probflow as pf

    out = []
    for path in files:
        try:
            sched = pf.load_schedule(path)
        except pf.TunedScheduleError as e:
            raise CLIError(f"--schedule-file: {e}") from None
        _check_tuned_eps("--schedule-file", path, sched, eps)
        matched = [s for s in sweeps if sched.steps in s.steps]
        if not matched:
            raise CLIError(f"--schedule-file: {path} has {sched.steps} steps, which no "
                           "fixed-step solver sweeps (add it to --ode-steps)")
        out += [pf.ODESweep(label=f"{s.label}+{Path(path).stem}", solver=s.solver,
                            steps=(sched.steps,), schedule=sched) for s in matched]
    return out


def tuned_solver_sweeps(files, model, sde, *, eps: float):
    """One sweep per tuned-solver file, at its own step count (labelled with the file's name);
    a file tuned for another model, SDE or eps is a one-line error."""
    from pathlib import Path

    import probflow as pf

    out = []
    for path in files:
        try:
            solver = pf.load_solver(path, model=model, sde=sde)
        except pf.TunedScheduleError as e:
            raise CLIError(f"--solver-file: {e}") from None
        assert isinstance(solver.schedule, pf.TunedSchedule)  # load_solver's are
        _check_tuned_eps("--solver-file", path, solver.schedule, eps)
        out.append(pf.ODESweep(label=Path(path).stem, solver=solver, steps=(solver.steps,)))
    return out


def build_sweeps(solvers, tolerances, step_counts, flag: str = "--solvers"):
    """One sweep per solver: over `tolerances` for diffrax solvers with an error estimate (when
    any are given), otherwise (and for the exponential integrators) over `step_counts`."""
    import probflow as pf

    from .._nfe import solver_traits

    sweeps = []
    for name in solvers:
        solver = make_solver(name, flag)
        traits = solver_traits(solver)
        adaptive = traits.adaptive and not traits.needs_binding
        if adaptive and tolerances:
            sweeps.append(pf.ODESweep(label=name, solver=solver, tolerances=tuple(tolerances)))
        elif step_counts:
            sweeps.append(pf.ODESweep(label=name, solver=solver, steps=tuple(step_counts)))
        else:
            raise CLIError(f"{flag}: {name} needs --ode-steps (it has no error estimate)")
    return sweeps


def stochastic_sweeps(kinds, steps):
    import probflow as pf

    kind = {"reverse-sde": "sde", "pc": "pc"}
    return [pf.StochasticSweep(label=k, kind=kind[k], steps=tuple(steps)) for k in kinds
            if steps]


def run_nfe_curve(loaded, ds, settings: CurveSettings, *, eps: float, seed: int, classifier,
                  desc: str = "nfe-curve"):
    """The sampling rows and (with `likelihood_images`) the likelihood rows."""
    import jax

    import probflow as pf

    reference = model_space(ds, loaded)
    ode = build_sweeps(settings.solvers, settings.tolerances, settings.ode_steps)
    fixed = [s for s in ode if s.steps]
    ode += scheduled_sweeps(fixed, settings.schedule_files, eps=eps)
    ode += tuned_solver_sweeps(settings.solver_files, loaded.model, loaded.sde, eps=eps)
    if settings.tune and not fixed:
        raise CLIError("--tune: no fixed-step solver to tune a schedule for (--solvers)")
    lik = build_sweeps(settings.likelihood_solvers, settings.tolerances, settings.ode_steps,
                       "--likelihood-solvers") if settings.likelihood_images else []
    stoch = stochastic_sweeps(settings.stochastic, settings.sde_steps)
    ref_solver = make_solver(settings.reference_solver, "--reference-solver")
    count = lambda sweeps: sum(len(s.tolerances) + len(s.steps) for s in sweeps)
    total = count(ode) + sum(len(s.steps) for s in stoch)
    total += count(lik) if settings.likelihood_images else 0
    tuned = fixed if settings.tune else []
    total += sum(len(s.steps) for s in tuned)
    bar = progress_bar(total, desc)

    def tick(msg):
        bar.set_postfix_str(msg)
        bar.update(1)

    # Tuned on their own latents (seed + 2), not the curve's (seed).
    for i, sweep in enumerate(tuned):
        ode.append(pf.tune_sweep(loaded.model, loaded.sde, sweep, shape=loaded.shape, eps=eps,
                                 key=jax.random.fold_in(jax.random.key(seed + 2), i),
                                 progress=tick))

    rows = pf.nfe_curve(
        loaded.model, loaded.sde, loaded.shape, key=jax.random.key(seed),
        num_samples=settings.num_samples, ode_sweeps=ode, stochastic_sweeps=stoch,
        reference_data=reference, classifier=classifier, eps=eps, clip=loaded.data_range,
        reference_solver=ref_solver, reference_tol=settings.reference_tol, progress=tick,
    )
    lik_rows = None
    if settings.likelihood_images:
        lik_rows = pf.likelihood_curve(
            loaded.model, loaded.sde, np.asarray(ds.images[: settings.likelihood_images]),
            key=jax.random.key(seed + 1), num_bins=ds.num_bins, data_range=loaded.data_range,
            sweeps=lik, reference_solver=ref_solver, reference_tol=settings.reference_tol,
            trace="rademacher", progress=tick,
        )
    bar.close()
    return rows, lik_rows


SAMPLE_COLUMNS = ["sampler", "setting", "nfe_mean", "nfe_max", "solver_error",
                  "sliced_wasserstein", "frechet"]
LIKELIHOOD_COLUMNS = ["sampler", "setting", "nfe_mean", "bpd", "bpd_error"]


def _run_nfe_curve(args) -> int:
    import probflow as pf

    out = out_path(args.out, ".png")
    out_path(args.json, None, "--json")
    settings = settings_from(args)
    loaded = load_args_model(args)
    ds = load_data(args.data, args.split)
    check_data_matches(ds, loaded)
    rows, lik = run_nfe_curve(loaded, ds, settings, eps=args.eps, seed=args.seed,
                              classifier=digits_classifier_for(ds))
    with writing("--out", out):
        pf.plot_nfe_curve(rows, out, likelihood_rows=lik,
                          title=f"{args.checkpoint} on {args.data}")
    print(format_rows(rows, SAMPLE_COLUMNS))
    if lik:
        print()
        print(format_rows(lik, LIKELIHOOD_COLUMNS))
    print(f"\nplot: {out}")
    write_json(args.json, {"checkpoint": args.checkpoint,
                           "settings": dataclasses.asdict(settings), "rows": rows,
                           "likelihood_rows": lik, "plot": str(out)})
    return 0


COMMANDS = (
    Command(
        name="nfe-curve",
        help="NFE-versus-quality curves of ODE, SDE and PC samplers",
        description="Sweep ODE solvers over tolerances or steps and the reverse-SDE and PC "
                    "samplers over steps; measure the solver error against a tight reference "
                    "from the same latents, sliced Wasserstein and Frechet distances to "
                    "held-out data, and |bpd - reference| of likelihood solves. The default is "
                    "a short sweep (about 5 minutes on 2 CPU cores); --full sweeps every solver "
                    "family. Writes JSON rows and a PNG plot.",
        add_arguments=_add_nfe_curve,
        run=_run_nfe_curve,
    ),
)
