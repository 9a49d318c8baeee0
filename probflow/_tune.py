"""Step schedules tuned to a model: `tune_schedule`, `TunedSchedule` and its file.

`tune_schedule` chooses the N - 1 interior times of a fixed-step solve so that the solver's
decode of a calibration batch of prior latents lands as close as possible (mean over latents of
the RMS error in model space) to a tight adaptive reference solve from the same latents. This
is LD3's idea (Tong et al. 2024, "Learning to Discretize Denoising Diffusion ODEs"): the times
are parametrised so that every choice is a valid schedule (positive increments in sqrt(t), ends
exact) and optimised by backpropagation through the fixed-step solve itself, with Adam.

Why gradients and not GITS's dynamic programming (Chen et al. 2024) on a teacher trajectory: the
dynamic programme scores a schedule by a sum of one-step errors from the teacher's states, which
is the solve's error only for single-step solvers; a multistep solver's (DPM-Solver++(2M),
UniPC, iPNDM) step depends on the earlier times through its history, and its one-step cost is
not defined without re-deriving the solver. Backpropagating through the real solve optimises the
quantity we report, for any fixed-step diffrax solver, probflow's exponential integrators and
any solver added later, with no knowledge of its internals.

The tuned times are a `TunedSchedule` (a plain `AbstractStepSchedule`: any solve takes it with
`steps=N`), saved as a small checksummed JSON file that records what it was tuned for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ._checkpoint import write_atomically
from ._flow import ProbabilityFlowODE, decode
from ._options import MAX_STEPS, ODEOptions
from ._sde import AbstractSDE
from ._time import AbstractClock, AbstractStepSchedule
from ._tuned_solver import TunedSolver
from ._validate import check_eps, check_positive_float, check_positive_int, check_sde, check_shape
from .models._base import AbstractScoreModel

FORMAT = "probflow-tuned-schedule"
SOLVER_FORMAT = "probflow-tuned-solver"
FORMAT_VERSION = 1
# Below this many steps `tune_solver` tunes scale corrections and matches only the end; from it
# on, no scale corrections and the path between steps as well (docs/samplers.md).
_FEW_STEPS = 8


class TunedScheduleError(ValueError):
    """A tuned-schedule file is missing, corrupted, or was tuned for something else."""


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12)


class TunedSchedule(AbstractStepSchedule):
    """Fixed times t_0 = T > t_1 > ... > t_N = eps, tuned to one model, SDE and solver.

    Made by `tune_schedule` or `load_schedule`. A solve from T to eps (decode, sampling) steps
    to its times; one from eps to T (encode) to them reversed; any other `steps` or ends raise.

    **Arguments:**

    - `ts`: the N + 1 times, Python floats decreasing strictly from T to eps > 0.
    - `model`: a fingerprint of the weights of the model it was tuned for.
    - `sde`: the repr of the SDE it was tuned for.
    - `solver`: the repr of the solver it was tuned for.
    - `time`: the name of the clock the tuning solves ran in.
    """

    ts: tuple[float, ...]
    model: str = ""
    sde: str = ""
    solver: str = ""
    time: str = "t"

    def __check_init__(self):
        ts = self.ts
        if not isinstance(ts, tuple) or len(ts) < 2:
            raise ValueError(f"times must be a tuple of at least 2 floats, got {ts!r}")
        if not all(isinstance(t, float) and math.isfinite(t) for t in ts):
            raise ValueError(f"times must be finite Python floats, got {ts!r}")
        if not all(a > b for a, b in zip(ts[:-1], ts[1:])):
            raise ValueError(f"times must decrease strictly from T to eps, got {ts!r}")
        if ts[-1] <= 0.0:
            raise ValueError(f"times must end at eps > 0, got {ts[-1]!r}")

    @property
    def steps(self) -> int:
        return len(self.ts) - 1

    def check_steps(self, steps: int) -> None:
        if steps != self.steps:
            raise ValueError(
                f"steps={steps} does not match this TunedSchedule, tuned for steps={self.steps}"
            )

    def times(self, sde, t0, t1, steps, dtype) -> Array:
        hi, lo = self.ts[0], self.ts[-1]
        self.check_steps(steps)
        if not ({_same(t0, hi), _same(t1, lo)} == {True} or {_same(t0, lo), _same(t1, hi)}
                == {True}):
            raise ValueError(
                f"this TunedSchedule runs between T={hi:g} and eps={lo:g}, got a solve from "
                f"{t0:g} to {t1:g}: pass eps={lo:g}"
            )
        ts = self.ts if t0 > t1 else self.ts[::-1]
        return jnp.asarray(ts, dtype).at[0].set(t0).at[-1].set(t1)


def _positive_int(value, name: str) -> int:
    n = check_positive_int(value, name)
    assert n is not None
    return n


def fingerprint(model) -> str:
    """SHA-256 of a model's array leaves (as float32) and structure: which network a schedule was
    tuned for, the same under float32 and float64 sessions."""
    leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_array))
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        a = np.asarray(leaf)
        a = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def describe_solver(solver) -> str:
    """The solver a schedule was tuned for, as recorded in its file (its repr)."""
    return repr(solver)


# --------------------------------------------------------------------------- the tuner


class _BatchFlow(eqx.Module):
    """The probability-flow ODE of a whole batch at one time (all latents share the times)."""

    flow: ProbabilityFlowODE

    def __call__(self, t, y, args):
        return jax.vmap(lambda yi: self.flow(t, yi, args))(y)


class _Parametrisation(eqx.Module):
    """Times from unconstrained parameters w: increments in u = sqrt(t) of u_0 - u_N times
    softmax(w), so every w gives a valid schedule with exact ends (w = log of a schedule's
    increments reproduces it)."""

    u0: float
    u1: float
    t0: float
    t1: float

    def __call__(self, w):
        frac = jnp.concatenate([jnp.zeros(1, w.dtype), jnp.cumsum(jax.nn.softmax(w))])
        ts = (self.u0 + (self.u1 - self.u0) * frac) ** 2
        return ts.at[0].set(self.t0).at[-1].set(self.t1)

    def inverse(self, ts):
        u = jnp.sqrt(ts)
        return jnp.log(jnp.abs(jnp.diff(u)))


def _fixed_step_solve(term, solver, cs, y0):
    """The solve diffrax runs with StepTo(cs), taken one diffeqsolve per step with the solver's
    state carried: a scan, so the model and its backward pass are compiled once and the backward
    pass stores each step instead of recomputing it. The initial state comes from a solve of
    length zero in the same direction (diffrax's own `init`, with its time flip)."""
    init = diffrax.diffeqsolve(
        term, solver, t0=cs[0], t1=cs[0], dt0=cs[1] - cs[0], y0=y0, max_steps=1,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )

    def body(carry, pair):
        y, state = carry
        sol = diffrax.diffeqsolve(
            term, solver, t0=pair[0], t1=pair[1], dt0=None, y0=y,
            stepsize_controller=diffrax.StepTo(ts=pair), max_steps=1,
            solver_state=state, saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )
        assert sol.ys is not None
        return (sol.ys[-1], sol.solver_state), sol.ys[-1]

    pairs = jnp.stack([cs[:-1], cs[1:]], axis=1)
    (y, _), ys = jax.lax.scan(body, (y0, init.solver_state), pairs)
    return y, ys


class _Objective(eqx.Module):
    """The tuning loss of the fixed-step decode on times param(w), with `coefficients` put into
    the solver when given (`tune_solver`).

    `tune_schedule`'s loss is the square of the mean over latents of each latent's RMS error (in
    model space): a few latents with large errors dominate a mean squared error, and schedules
    tuned to them did worse on other latents (docs/samplers.md). `tune_solver`'s is the mean
    squared error itself, the square of the RMS error we report: with its coefficients free it
    generalised to other latents as well as on the calibration batch (docs/samplers.md)."""

    term: diffrax.ODETerm
    solver: diffrax.AbstractSolver
    clock: AbstractClock = eqx.field(static=True)
    sde: AbstractSDE
    param: _Parametrisation
    squared_error: bool = eqx.field(static=True)
    mask: Array | None = None
    path: diffrax.Solution | None = None
    path_weight: float = eqx.field(static=True, default=0.0)

    def __call__(self, params, z, ref):
        w, coefficients = params
        solver = self.solver
        if coefficients is not None:
            assert self.mask is not None
            solver = eqx.tree_at(lambda s: s.coefficients, solver, coefficients * self.mask)
        ts = self.param(w)
        cs = self.clock.to_clock(self.sde, ts)
        x, xs = _fixed_step_solve(self.term, solver, cs, z)
        d = jnp.reshape(x - ref, (x.shape[0], -1))
        if self.squared_error:
            if self.path is None:
                return jnp.mean(d**2)
            # The states between the steps against the reference path at the same times.
            mid = jax.vmap(self.path.evaluate)(cs[1:-1])
            return jnp.mean(d**2) + self.path_weight * jnp.mean((xs[:-1] - mid) ** 2)
        return jnp.mean(jnp.sqrt(jnp.mean(d**2, axis=1) + 1e-20)) ** 2


@eqx.filter_jit
def _loss_and_grad(objective, params, z, ref):
    return jax.value_and_grad(objective)(params, z, ref)


class _LBFGSStep(eqx.Module):
    """One L-BFGS step (optax, zoom line search) on the objective at fixed data."""

    objective: _Objective
    optimiser: Any = eqx.field(static=True)

    def __call__(self, params, state, z, ref):
        import optax

        fn = lambda p: self.objective(p, z, ref)
        value, grad = optax.value_and_grad_from_state(fn)(params, state=state)
        updates, state = self.optimiser.update(grad, state, params, value=value, grad=grad,
                                               value_fn=fn)
        return optax.apply_updates(params, updates), state, value


@eqx.filter_jit
def _lbfgs_step(step, params, state, z, ref):
    return step(params, state, z, ref)


def _adam(objective, learning_rate: float):
    """`tune_schedule`'s optimiser for `_minimise`: its initial state and its step, which returns
    the parameters after one Adam step and the loss at the parameters it was given."""
    import optax  # imported when tuning: `import probflow` stays quicker

    optimiser = optax.adam(learning_rate)

    def step(params, state, z, ref):
        loss, grad = _loss_and_grad(objective, params, z, ref)
        updates, state = optimiser.update(grad, state)
        return optax.apply_updates(params, updates), state, loss

    return optimiser.init, step


def _lbfgs(objective):
    """`tune_solver`'s optimiser for `_minimise`, L-BFGS: for a few dozen smooth parameters it
    reaches in 40 steps what Adam reached in 100 (docs/samplers.md), at one or two solves a
    step."""
    import optax

    optimiser = optax.lbfgs()

    def init(params):
        # Strong types, so that the state after a step has the types of the first one (one
        # compile).
        return jax.tree_util.tree_map(lambda a: jnp.array(a, dtype=a.dtype),
                                      optimiser.init(params))

    return init, functools.partial(_lbfgs_step, _LBFGSStep(objective, optimiser))


def _minimise(optimiser, params, z, ref, iterations: int, progress, who: str) -> Any:
    """The best parameters seen on the calibration batch in `iterations` steps of `optimiser`
    (an (init, step) pair) from `params`, so never worse there than the start."""
    init, step = optimiser
    state = init(params)
    best_params, best = params, math.inf
    for i in range(iterations + 1):
        new_params, new_state, loss = step(params, state, z, ref)
        loss = float(loss)  # the loss at `params`
        if math.isfinite(loss) and loss < best:
            best_params, best = params, loss
        if progress is not None:
            progress(i, math.sqrt(loss))
        if i == iterations or not math.isfinite(loss):
            break
        params, state = new_params, new_state
    if not math.isfinite(best):
        raise ValueError(f"{who}: the solve is not finite on the calibration batch")
    return best_params


class _Setup(eqx.Module):
    """What both tuners build from their arguments: the plan's clock and starting times, the
    calibration latents and their reference decode, the flow's term and the time
    parametrisation."""

    clock: AbstractClock = eqx.field(static=True)
    ts0: Array
    z: Array
    ref: Array
    term: diffrax.ODETerm
    param: _Parametrisation


def _setup(model, sde, opts: ODEOptions, steps, *, key, shape, num_latents, eps,
           reference_solver, reference_tol) -> _Setup:
    clock = opts.time
    assert opts.schedule is not None  # fixed steps always have one
    dtype = jnp.result_type(float)
    t_hi, t_lo = float(sde.T), float(eps)
    ts0 = opts.schedule.times(sde, t_hi, t_lo, steps, dtype)
    z = jax.vmap(lambda k: sde.prior_sample(k, shape, dtype))(jax.random.split(key, num_latents))
    ref_solver = diffrax.Tsit5() if reference_solver is None else reference_solver
    ref = decode(model, sde, z, eps=eps, solver=ref_solver, rtol=reference_tol,
                 atol=reference_tol).x
    term = diffrax.ODETerm(clock.wrap(_BatchFlow(ProbabilityFlowODE(model, sde)), sde))
    param = _Parametrisation(math.sqrt(t_hi), math.sqrt(t_lo), t_hi, t_lo)
    return _Setup(clock, ts0, z, ref, term, param)


def _reference_path(setup: _Setup, sde, reference_solver, reference_tol) -> diffrax.Solution:
    """The reference decode of the calibration batch as a dense solution (one adaptive solve of
    the whole batch in the plan's clock), to compare the tuned solve's states between steps
    with: `tune_solver`'s `path_weight`."""
    cs = setup.clock.to_clock(sde, setup.ts0)
    solver = diffrax.Tsit5() if reference_solver is None else reference_solver
    return diffrax.diffeqsolve(
        setup.term, solver, t0=cs[0], t1=cs[-1], dt0=None, y0=setup.z, max_steps=MAX_STEPS,
        stepsize_controller=diffrax.PIDController(rtol=reference_tol, atol=reference_tol),
        saveat=diffrax.SaveAt(dense=True),
    )


def _check_tuning(model, sde, steps, shape, num_latents, eps, reference_tol):
    """The arguments both tuners share, checked (one-line ValueErrors naming the argument)."""
    sde = check_sde(sde)
    eps = check_eps(eps, sde)
    if not callable(model):
        raise ValueError(f"model must be a callable model(t, x) -> score, got {type(model)}")
    if shape is None:
        if not isinstance(model, AbstractScoreModel):
            raise ValueError("shape must be given (one example's shape) for this model")
        shape = tuple(model.shape)
    shape = check_shape(shape)
    steps = _positive_int(steps, "steps")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (a 1-step schedule has no times to tune), "
                         f"got {steps}")
    num_latents = _positive_int(num_latents, "num_latents")
    reference_tol = check_positive_float(reference_tol, "reference_tol")
    return sde, eps, shape, steps, num_latents, reference_tol


def _tuned_times(setup: _Setup, w, model, sde, solver_repr: str) -> TunedSchedule:
    tuned = np.asarray(setup.param(w), np.float64)
    t_hi, t_lo = setup.param.t0, setup.param.t1
    return TunedSchedule(
        ts=(t_hi, *(float(t) for t in tuned[1:-1]), t_lo), model=fingerprint(model),
        sde=repr(sde), solver=solver_repr, time=setup.clock.name,
    )


def tune_schedule(
    model: Callable,
    sde: AbstractSDE,
    solver: diffrax.AbstractSolver,
    steps: int,
    *,
    key: PRNGKeyArray,
    shape: tuple[int, ...] | None = None,
    num_latents: int = 64,
    iterations: int = 20,
    learning_rate: float = 0.05,
    eps: float = 1e-3,
    time: str | AbstractClock = "t",
    init: str | AbstractStepSchedule | None = None,
    reference_solver: diffrax.AbstractSolver | None = None,
    reference_tol: float = 1e-5,
    progress: Callable[[int, float], None] | None = None,
) -> TunedSchedule:
    """A step schedule of `steps` steps from T to eps, tuned to `model` for `solver`.

    The times minimise the mean over a calibration batch of prior latents of the RMS error, in
    model space, of `solver`'s fixed-step decode against a tight reference solve from the same
    latent.
    They start from `init` and take `iterations` Adam steps on the log-increments of the times
    in sqrt(t), by backpropagation through the solve (LD3's approach; see the module's docstring
    for why not GITS's dynamic programming). The best schedule seen on the calibration batch is
    returned, so it is never worse there than `init`. Evaluate it on other latents.

    **Arguments:**

    - `model`: the score model, `model(t, x)` for one example.
    - `sde`: its SDE.
    - `solver`: any fixed-step diffrax solver or probflow exponential integrator.
    - `steps`: N >= 2, the number of steps the schedule is for.
    - `key`: draws the calibration latents, `sde.prior_sample(k, shape)` for each k in
      `jax.random.split(key, num_latents)`.
    - `shape`: one example's shape (default `model.shape` for probflow's score models).
    - `num_latents`: the calibration batch size.
    - `iterations`: the number of Adam steps.
    - `learning_rate`: Adam's step size on the log-increments.
    - `eps`: the time the decode ends at (the schedule's last time).
    - `time`: the clock the solves run in ("t", "log_snr" or a clock), as in `pf.decode`.
    - `init`: the starting schedule (None: the one an untuned solve with `solver` uses).
    - `reference_solver`: the adaptive solver of the reference (default `diffrax.Tsit5()`).
    - `reference_tol`: its rtol = atol.
    - `progress`: called as `progress(i, error)` after each evaluation of the objective, with the
      mean per-latent RMS error on the calibration batch of the schedule it evaluated (i = 0 is
      `init`).

    **Returns:** a `TunedSchedule`; pass it as `schedule=` with `steps=N` to any solve.
    """
    sde, eps, shape, steps, num_latents, reference_tol = _check_tuning(
        model, sde, steps, shape, num_latents, eps, reference_tol)
    iterations = _positive_int(iterations, "iterations")
    learning_rate = check_positive_float(learning_rate, "learning_rate")
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"solver must be a diffrax solver, got {type(solver).__name__}")
    # The same edge as a solve: checks the solver, steps and clock; gives the default schedule.
    opts = ODEOptions(solver=solver, steps=steps, time=time, schedule=init)
    setup = _setup(model, sde, opts, steps, key=key, shape=shape, num_latents=num_latents,
                   eps=eps, reference_solver=reference_solver, reference_tol=reference_tol)
    bound = opts.solver
    if opts.traits.needs_binding:
        bound = bound.bind(sde, setup.clock, steps)  # pyright: ignore[reportAttributeAccessIssue]
    objective = _Objective(setup.term, bound, setup.clock, sde, setup.param, False)
    w, _ = _minimise(_adam(objective, learning_rate), (setup.param.inverse(setup.ts0), None),
                     setup.z, setup.ref, iterations, progress, "tune_schedule")
    return _tuned_times(setup, w, model, sde, describe_solver(solver))


def tune_solver(
    model: Callable,
    sde: AbstractSDE,
    steps: int,
    *,
    key: PRNGKeyArray,
    shape: tuple[int, ...] | None = None,
    history: int = 2,
    scale_corrections: bool | None = None,
    path_weight: float | None = None,
    num_latents: int = 64,
    iterations: int | None = None,
    eps: float = 1e-3,
    time: str | AbstractClock = "t",
    init: str | AbstractStepSchedule | None = None,
    reference_solver: diffrax.AbstractSolver | None = None,
    reference_tol: float = 1e-5,
    progress: Callable[[int, float], None] | None = None,
) -> TunedSolver:
    """A `TunedSolver` of `steps` steps from T to eps: DPM-Solver++(2M) with its step times and
    per-step coefficients tuned to `model`.

    Times and coefficients together minimise the mean squared error, in model space, of the
    solver's fixed-step decode of a calibration batch of prior latents against a tight reference
    solve from the same latents, plus `path_weight` times the mean squared error of the states
    between the steps against the reference path at the same times: `iterations` L-BFGS steps
    (gradients by backpropagation through the solve), from DPM-Solver++(2M) on `init`
    (coefficients zero). The best seen on the calibration batch is returned. Evaluate it on other
    latents (docs/samplers.md).

    The defaults depend on `steps`, as measured on the shipped models (docs/samplers.md): below 8
    steps the scale corrections g are tuned and only the end is matched; from 8 steps on, g stays
    zero (the solver then reproduces a constant data prediction exactly) and the path is matched
    with weight 1, which kept the tuned solver from pushing a few held-out latents far off.

    **Arguments:**

    - `model`: the score model, `model(t, x)` for one example.
    - `sde`: its SDE.
    - `steps`: N >= 2, the number of steps (= score evaluations).
    - `key`: draws the calibration latents, as `tune_schedule`.
    - `shape`: one example's shape (default `model.shape` for probflow's score models).
    - `history`: H >= 1, the earlier evaluations each step may combine.
    - `scale_corrections`: whether the scale corrections g_i are tuned (False: they stay zero).
      None: True below 8 steps.
    - `path_weight`: the weight of the states between the steps in the loss (0: the end only).
      None: 0 below 8 steps, else 1.
    - `num_latents`: the calibration batch size.
    - `iterations`: the number of L-BFGS steps (None: 350 // steps, at least 20, so that the
      tuning costs about the same at every N: under 2 minutes here for the shipped models at
      N <= 10, docs/samplers.md).
    - `eps`: the time the decode ends at.
    - `time`: the clock the solves run in ("t" or "log_snr").
    - `init`: the starting schedule (None: DPM-Solver++(2M)'s default, uniform in sqrt(t)).
    - `reference_solver`: the adaptive solver of the reference (default `diffrax.Tsit5()`).
    - `reference_tol`: its rtol = atol.
    - `progress`: called as `progress(i, root_loss)` after each evaluation of the objective on
      the calibration batch, with the loss's square root (the RMS error of the end when
      `path_weight` is 0; i = 0 is the untuned start).

    **Returns:** a `TunedSolver`; pass it as `solver=` with `steps=N` to `decode` or
    `sample_ode`.
    """
    sde, eps, shape, steps, num_latents, reference_tol = _check_tuning(
        model, sde, steps, shape, num_latents, eps, reference_tol)
    iterations = (max(20, 350 // steps) if iterations is None
                  else _positive_int(iterations, "iterations"))
    history = _positive_int(history, "history")
    few = steps < _FEW_STEPS
    if scale_corrections is None:
        scale_corrections = few
    elif not isinstance(scale_corrections, bool):
        raise ValueError(f"scale_corrections must be True, False or None, got "
                         f"{scale_corrections!r}")
    if path_weight is None:
        path_weight = 0.0 if few else 1.0
    elif not (isinstance(path_weight, (int, float)) and not isinstance(path_weight, bool)
              and math.isfinite(path_weight) and path_weight >= 0.0):
        raise ValueError(f"path_weight must be a finite float >= 0, got {path_weight!r}")
    start = TunedSolver(jnp.zeros((steps, history + 1), jnp.result_type(float)))
    opts = ODEOptions(solver=start, steps=steps, time=time, schedule=init)
    setup = _setup(model, sde, opts, steps, key=key, shape=shape, num_latents=num_latents,
                   eps=eps, reference_solver=reference_solver, reference_tol=reference_tol)
    bound = start.bind(sde, setup.clock, steps)
    dtype = start.coefficients.dtype
    mask = jnp.ones((steps, history + 1), dtype).at[:, 0].set(float(scale_corrections))
    path = (_reference_path(setup, sde, reference_solver, reference_tol)
            if path_weight > 0.0 else None)
    objective = _Objective(setup.term, bound, setup.clock, sde, setup.param, True, mask, path,
                           float(path_weight))
    w, coefficients = _minimise(_lbfgs(objective),
                                (setup.param.inverse(setup.ts0), start.coefficients),
                                setup.z, setup.ref, iterations, progress, "tune_solver")
    schedule = _tuned_times(setup, w, model, sde, describe_solver(start))
    return TunedSolver(coefficients * mask, schedule)


# --------------------------------------------------------------------------- the file


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _schedule_body(fmt: str, schedule: TunedSchedule, info) -> dict:
    return {
        "format": fmt, "version": FORMAT_VERSION, "steps": schedule.steps,
        "times": list(schedule.ts), "model": schedule.model, "sde": schedule.sde,
        "solver": schedule.solver, "time": schedule.time, "info": dict(info or {}),
    }


def _write(path, body: dict) -> None:
    text = json.dumps({**body, "sha256": _digest(body)}, indent=1, sort_keys=True)
    write_atomically(path, (text + "\n").encode())


def save_schedule(path: str | os.PathLike, schedule: TunedSchedule,
                  info: dict[str, Any] | None = None) -> None:
    """Write a tuned schedule to its own small file: JSON with its times, steps, what it was
    tuned for and `info`, plus a SHA-256 of the rest; written atomically.

    **Arguments:**

    - `path`: the file to write.
    - `schedule`: a `TunedSchedule`.
    - `info`: JSON-serialisable notes stored with it (e.g. the calibration errors).
    """
    if not isinstance(schedule, TunedSchedule):
        raise ValueError(f"schedule must be a TunedSchedule, got {type(schedule).__name__}")
    _write(path, _schedule_body(FORMAT, schedule, info))


def save_solver(path: str | os.PathLike, solver: TunedSolver,
                info: dict[str, Any] | None = None) -> None:
    """Write a tuned solver to its own small file: its schedule's file (`save_schedule`) with
    the coefficients added; written atomically.

    **Arguments:**

    - `path`: the file to write.
    - `solver`: a `TunedSolver` made by `tune_solver` (its schedule a `TunedSchedule`).
    - `info`: JSON-serialisable notes stored with it.
    """
    if not isinstance(solver, TunedSolver) or not isinstance(solver.schedule, TunedSchedule):
        raise ValueError("solver must be a TunedSolver made by tune_solver or load_solver, "
                         f"got {type(solver).__name__}")
    body = _schedule_body(SOLVER_FORMAT, solver.schedule, info)
    body["coefficients"] = np.asarray(solver.coefficients, np.float64).tolist()
    _write(path, body)


def _read(path, fmt: str, what: str) -> tuple[dict, TunedSchedule]:
    """The checked body of a file written by `_write` in format `fmt`, and its schedule."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode())
    except FileNotFoundError:
        raise TunedScheduleError(f"no such {what} file: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TunedScheduleError(f"{what} file is not valid JSON: {path}") from None
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise TunedScheduleError(f"not a probflow {what} file: {path}")
    body = {k: v for k, v in raw.items() if k != "sha256"}
    if raw.get("sha256") != _digest(body):
        raise TunedScheduleError(f"{what} file is corrupted (checksum mismatch): {path}")
    if raw.get("version") != FORMAT_VERSION:
        raise TunedScheduleError(f"{what} file has version {raw.get('version')!r}, "
                                 f"expected {FORMAT_VERSION}: {path}")
    try:
        sched = TunedSchedule(
            ts=tuple(float(t) for t in raw["times"]), model=str(raw["model"]),
            sde=str(raw["sde"]), solver=str(raw["solver"]), time=str(raw["time"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TunedScheduleError(f"{what} file is invalid ({msg}): {path}") from None
    if sched.steps != raw.get("steps"):
        raise TunedScheduleError(f"{what} file is invalid (steps): {path}")
    return body, sched


def _check_for(path, what: str, sched: TunedSchedule, checks) -> None:
    for name, given, describe in checks:
        if given is not None and describe(given) != getattr(sched, name):
            raise TunedScheduleError(
                f"{name}: the {what} at {path} was tuned for another {name} "
                f"({getattr(sched, name)[:60]})"
            )


def load_schedule(path: str | os.PathLike, *, model: Callable | None = None,
                  sde: AbstractSDE | None = None,
                  solver: diffrax.AbstractSolver | None = None) -> TunedSchedule:
    """The `TunedSchedule` saved by `save_schedule` at `path`.

    A missing, damaged or foreign file, or one tuned for another model, SDE or solver than those
    given, raises `TunedScheduleError` (a ValueError) with a one-line message.

    **Arguments:**

    - `path`: the file.
    - `model`: if given, the model it must have been tuned for (a fingerprint of its weights).
    - `sde`: if given, the SDE it must have been tuned for.
    - `solver`: if given, the solver it must have been tuned for.
    """
    _, sched = _read(path, FORMAT, "tuned-schedule")
    _check_for(path, "tuned schedule", sched, (("model", model, fingerprint), ("sde", sde, repr),
                                               ("solver", solver, describe_solver)))
    return sched


def load_solver(path: str | os.PathLike, *, model: Callable | None = None,
                sde: AbstractSDE | None = None) -> TunedSolver:
    """The `TunedSolver` saved by `save_solver` at `path`.

    A missing, damaged or foreign file, or one tuned for another model or SDE than those given,
    raises `TunedScheduleError` (a ValueError) with a one-line message.

    **Arguments:**

    - `path`: the file.
    - `model`: if given, the model it must have been tuned for (a fingerprint of its weights).
    - `sde`: if given, the SDE it must have been tuned for.
    """
    body, sched = _read(path, SOLVER_FORMAT, "tuned-solver")
    _check_for(path, "tuned solver", sched, (("model", model, fingerprint), ("sde", sde, repr)))
    try:
        c = np.asarray(body["coefficients"], np.float64)
        if c.ndim != 2 or c.shape[0] != sched.steps or not np.all(np.isfinite(c)):
            raise ValueError("coefficients")
        return TunedSolver(jnp.asarray(c, jnp.result_type(float)), sched)
    except (KeyError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TunedScheduleError(f"tuned-solver file is invalid ({msg}): {path}") from None
