"""Adaptive solves of many independent ODEs whose cost follows the mean NFE, not the maximum.

A vmapped `diffeqsolve` runs every example's while loop in lockstep: the batch keeps evaluating
until its slowest example finishes, so it pays the largest NFE for every example. Here `S` slots
each solve one example; an iteration makes one step (one `solver.step` and one PID decision,
diffrax's own) in every slot, and a slot whose example has finished is refilled at once with the
next example of the queue. Only the last examples leave slots idle, at most one solve's duration.

Per example the arithmetic is exactly that of a single-example solve: diffrax's solver step and
`PIDController.adapt_step_size` on that example alone, diffrax's clipping of the last step, and
the initial step size of Hairer, Norsett & Wanner (II.4) of `_nfe.select_initial_step`. So an
example's result, step count and `nfe` do not depend on the batch, on the slot count or on its
position in the queue (tested).

Evaluations: the initial step selection evaluates F(t0, y0) and once more (2 per example, made
for all examples in one batched call before the loop). For first-same-as-last Runge--Kutta
tableaus F(t0, y0) is the first stage of the first step, so it is handed to the solver instead of
being evaluated again, also when the first step is rejected; every attempted step then costs
`stages - 1` evaluations. Other tableaus cost `stages` per attempted step.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._divergence import AugmentedProbabilityFlowODE
from ._dpm import AbstractExponentialIntegrator
from ._failures import MAX_STEPS, NONFINITE, OK, STALLED, Failure, input_failure
from ._nfe import (
    error_order,
    has_error_estimate,
    select_initial_step,
    solver_costs,
)
from ._sde import AbstractSDE
from ._time import AbstractClock, LinearTime
from ._validate import check_model

__all__ = [
    "check_refill_solver",
    "count_refill_evaluations",
    "default_slots",
    "refill_log_likelihood",
    "refill_solve",
]


class _Reversed(eqx.Module):
    """F run backwards: dy/ds = -F(-s, y), so that a decreasing clock becomes increasing."""

    vector_field: Callable

    def __call__(self, s, y, args):
        out = self.vector_field(-s, y, args)
        return jtu.tree_map(lambda a: -a, out)


def _is_erk(solver) -> bool:
    return (
        not isinstance(solver, diffrax.HalfSolver)  # isinstance sees through the wrapper
        and isinstance(solver, diffrax.AbstractRungeKutta)
        and isinstance(solver.tableau, diffrax.ButcherTableau)
        and not solver.tableau.implicit
    )


def _fsal(solver) -> bool:
    return _is_erk(solver) and bool(solver.tableau.fsal)


def check_refill_solver(solver, clock: AbstractClock) -> None:
    """ValueError unless `solver` is adaptive and its evaluations per step are known here."""
    if _is_erk(solver):
        if not has_error_estimate(solver):
            raise ValueError(
                f"slots= needs an adaptive solver; solver={type(solver).__name__} has no error "
                "estimate (use diffrax.Tsit5(), Dopri5() or Bosh3(), or pass slots=None)"
            )
        return
    if isinstance(solver, AbstractExponentialIntegrator) and solver.supports_adaptive:
        if not isinstance(clock, LinearTime):
            raise ValueError(
                f"slots= runs {type(solver).__name__} in time='t' only, got time={clock.name!r} "
                "(or pass slots=None to solve the batch in lockstep)"
            )
        return
    raise ValueError(
        f"slots= supports adaptive explicit Runge-Kutta solvers (Tsit5, Dopri5, Bosh3, ...) and "
        f"the adaptive pf.DPMSolver(order=2|3); got solver={type(solver).__name__} (pass "
        "slots=None to solve the batch in lockstep)"
    )


def count_refill_evaluations(solver, num_steps: Array) -> Array:
    """Vector-field evaluations of one example's solve in `refill_solve` that attempted
    `num_steps` steps: 2 for the initial step size, the solver's cost at initialisation, then its
    cost per later attempt for every attempt (`_nfe.solver_costs`), the first included: an FSAL
    tableau's first stage is the initial selection's F(t0, y0), so no attempt pays it again."""
    init, _, later = solver_costs(solver)
    num_steps = jnp.asarray(num_steps, jnp.int32)
    return (2 + init + later * num_steps).astype(jnp.int32)


def default_slots(example_size: int) -> int:
    """`slots="auto"` for examples of `example_size` dimensions. On CPU the cost per example of a
    batched evaluation stops falling at a few dozen examples, and fewer slots leave fewer idle
    at the end: 64 slots up to 512 dimensions (8x8 digits), 32 up to 2048 (28x28 MNIST), else 16
    (measured with benchmarks/likelihood_real.py: MNIST took 34 s with 32 slots, 40 s with 64
    and 16). Accelerators need wide batches to be busy: 1024."""
    if jax.default_backend() != "cpu":
        return 1024
    return 64 if example_size <= 512 else 32 if example_size <= 2048 else 16


def _leaves(tree) -> Array:
    return jnp.concatenate([jnp.ravel(a) for a in jtu.tree_leaves(tree)])


class _Slots(eqx.Module):
    """The loop state: per-slot solver state (leading axis S) and the per-example outputs."""

    index: Array  # [S] the example in each slot; N marks an idle slot
    tprev: Array  # [S]
    tnext: Array  # [S]
    y: PyTree  # [S, ...]
    args: PyTree  # [S, ...]
    solver_state: PyTree
    controller_state: PyTree
    num_steps: Array  # [S]
    queue: Array  # the next example to start
    out_y: PyTree  # [N, ...]
    out_steps: Array  # [N]
    out_status: Array  # [N] 0 running/not started, 1 finished, 2 max_steps, 3 non-finite,
    # 4 step size collapsed
    out_t: Array  # [N] the clock's time where each example's solve ended


def refill_solve(
    make_vector_field: Callable,
    y0: PyTree,
    args: PyTree,
    t0: float,
    t1: float,
    *,
    solver: diffrax.AbstractSolver,
    rtol,
    atol,
    slots: int,
    max_steps: int,
    clock: AbstractClock,
    sde: AbstractSDE,
):
    """Solve dy/dt = F_i(t, y) from t0 to t1 for N independent examples with `slots` slots.

    `make_vector_field(args_i)` returns example i's vector field `F_i(t, y, args)` (diffrax
    convention, args unused); `y0` and `args` are pytrees with a leading axis N. The solve runs in
    `clock` (`_time.py`), which maps [t0, t1] to its own variable and wraps the field; `sde` is
    the probability-flow ODE's SDE (for the clock and the exponential integrators). Returns
    `(y1, nfe, num_steps, status, t_end)` with leading axis N; status is 1 for a finished solve,
    2 for max_steps reached, 3 for a non-finite state (the attempted step's, which ends the solve
    at once), 4 for a step size collapsed below the resolution of t; t_end is where the solve
    ended, in t.
    """
    n = jtu.tree_leaves(y0)[0].shape[0]
    dtype = jtu.tree_leaves(y0)[0].dtype
    s = min(int(slots), n)

    check_refill_solver(solver, clock)
    c0, c1 = clock.static_to_clock(sde, t0), clock.static_to_clock(sde, t1)
    reverse = c1 < c0  # e.g. log-SNR falls with t: solve in -c, where the clock rises
    if reverse:
        c0, c1 = -c0, -c1

    def field(a):
        vf = clock.wrap(make_vector_field(a), sde)
        return _Reversed(vf) if reverse else vf

    if isinstance(solver, AbstractExponentialIntegrator):
        solver = solver.bind(sde, clock, None)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    c0a, c1a = jnp.asarray(c0, dtype), jnp.asarray(c1, dtype)
    # diffrax rounds a next time within 100 ULPs of t1 to t1 (`_integrate._clip_to_end`).
    c1_floor = c1a
    for _ in range(100):
        c1_floor = eqx.internal.prevbefore(c1_floor)

    a0 = jtu.tree_map(lambda a: a[0], args)
    term0 = diffrax.ODETerm(field(a0))
    order = error_order(solver, term0)  # as the per-example solves give select_initial_step
    err_order = solver.error_order(term0)  # as diffrax's loop gives the controller
    fsal = _fsal(solver)

    # The first step of every example, batched (2 evaluations each).
    dt0, f0 = jax.vmap(
        lambda y, a: select_initial_step(field(a), y, c0a, c1a, rtol, atol, order)
    )(y0, args)

    def start(y, a, dt, f):
        """Solver and controller state of a fresh example."""
        term = diffrax.ODETerm(field(a))
        tnext = jnp.minimum(c0a + dt, c1a)
        if fsal:
            solver_state = (jnp.asarray(False), f)
        else:
            solver_state = solver.init(term, c0a, tnext, y, None)
        _, controller_state = controller.init(term, c0a, tnext, y, dt, None, None, err_order)
        controller_state = jtu.tree_map(jnp.asarray, controller_state)
        return tnext, solver_state, controller_state

    take = lambda tree, idx: jtu.tree_map(lambda a: a[idx], tree)
    first = jnp.arange(s)
    tnext, solver_state, controller_state = jax.vmap(start)(
        take(y0, first), take(args, first), dt0[:s], take(f0, first)
    )
    out_y = jtu.tree_map(jnp.zeros_like, y0)
    state = _Slots(
        index=first.astype(jnp.int32),
        tprev=jnp.full((s,), c0a),
        tnext=tnext,
        y=take(y0, first),
        args=take(args, first),
        solver_state=solver_state,
        controller_state=controller_state,
        num_steps=jnp.zeros((s,), jnp.int32),
        queue=jnp.asarray(s, jnp.int32),
        out_y=out_y,
        out_steps=jnp.zeros((n,), jnp.int32),
        out_status=jnp.zeros((n,), jnp.int32),
        out_t=jnp.zeros((n,), dtype),
    )

    def step_one(tprev, tnext, y, a, solver_state, controller_state, num_steps):
        # One iteration of diffrax's `_integrate.loop` body for one example.
        term = diffrax.ODETerm(field(a))
        y1, y_error, _, new_solver_state, _ = solver.step(
            term, tprev, tnext, y, None, solver_state, False
        )
        y_error = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_error)
        keep, new_tprev, new_tnext, _, new_cstate, _ = controller.adapt_step_size(
            tprev, tnext, y, y1, None, y_error, err_order, controller_state
        )
        # A non-finite attempt ends the solve at its start (rather than being rejected until
        # max_steps); a next step below 16 ulps of t means the solve could never finish.
        finite = jnp.all(jnp.isfinite(_leaves(y1))) & jnp.isfinite(new_tnext)
        keep = keep & finite
        new_tprev = jnp.where(finite, new_tprev, tprev)
        stalled = new_tnext - new_tprev <= 16 * jnp.finfo(dtype).eps * jnp.abs(new_tprev)
        new_cstate = jtu.tree_map(jnp.asarray, new_cstate)
        new_tprev = jnp.minimum(new_tprev, c1a)
        clip = new_tnext > c1_floor
        new_tnext = jnp.where(
            clip, jnp.where(keep, c1a, new_tprev + 0.5 * (c1a - new_tprev)), new_tnext
        )
        sel = lambda a_, b_: jnp.where(keep, a_, b_)
        y = jtu.tree_map(sel, y1, y)
        solver_state = jtu.tree_map(sel, new_solver_state, solver_state)
        num_steps = (num_steps + 1).astype(jnp.int32)
        status = jnp.where(
            ~finite, 3, jnp.where(new_tprev >= c1a, 1, jnp.where(
                stalled, 4, jnp.where(num_steps >= max_steps, 2, 0)))
        )
        return new_tprev, new_tnext, y, solver_state, new_cstate, num_steps, status

    def cond(st: _Slots):
        return jnp.any(st.index < n)

    def body(st: _Slots):
        tprev, tnext, y, solver_state, cstate, num_steps, status = jax.vmap(step_one)(
            st.tprev, st.tnext, st.y, st.args, st.solver_state, st.controller_state,
            st.num_steps,
        )
        active = st.index < n
        done = active & (status > 0)
        # Write finished examples out (an out-of-range index drops the write).
        where_out = jnp.where(done, st.index, n)
        out_y = jtu.tree_map(lambda o, v: o.at[where_out].set(v, mode="drop"), st.out_y, y)
        out_steps = st.out_steps.at[where_out].set(num_steps, mode="drop")
        out_status = st.out_status.at[where_out].set(status, mode="drop")
        out_t = st.out_t.at[where_out].set(tprev, mode="drop")
        # Refill: the k-th finished slot takes example queue + k.
        rank = jnp.cumsum(done, dtype=jnp.int32) - 1
        new_index = jnp.where(done, st.queue + rank, st.index)
        new_index = jnp.where(new_index >= n, n, new_index).astype(jnp.int32)
        fresh = done & (new_index < n)
        safe = jnp.minimum(new_index, n - 1)
        ny, na = take(y0, safe), take(args, safe)
        ntnext, nsolver, ncontroller = jax.vmap(start)(ny, na, dt0[safe], take(f0, safe))
        pick = lambda new, old: jax.vmap(lambda f, a_, b_: jnp.where(f, a_, b_))(fresh, new, old)
        return _Slots(
            index=new_index,
            tprev=jnp.where(fresh, c0a, tprev),
            tnext=jnp.where(fresh, ntnext, tnext),
            y=jtu.tree_map(pick, ny, y),
            args=jtu.tree_map(pick, na, st.args),
            solver_state=jtu.tree_map(pick, nsolver, solver_state),
            controller_state=jtu.tree_map(pick, ncontroller, cstate),
            num_steps=jnp.where(fresh, 0, num_steps).astype(jnp.int32),
            queue=st.queue + jnp.sum(done, dtype=jnp.int32),
            out_y=out_y,
            out_steps=out_steps,
            out_status=out_status,
            out_t=out_t,
        )

    final = jax.lax.while_loop(cond, body, state)
    nfe = count_refill_evaluations(solver, final.out_steps)
    t_end = clock.to_time(sde, -final.out_t if reverse else final.out_t)
    return final.out_y, nfe, final.out_steps, final.out_status, t_end


# --------------------------------------------------------------------------- likelihoods


@eqx.filter_jit
def refill_log_likelihood(model, sde, x, keys, eps, opts, estimator, divergence_mode, slots):
    """`_likelihood._log_likelihood` with the examples scheduled over `slots` slots
    (`refill_solve`).

    The same probes (`estimator.draw` with each example's key) and the same per-example solve,
    so the result equals the lockstep one to float rounding; only the cost differs.
    """
    check_model(model, x.shape[1:], x.dtype)
    probes = jax.vmap(lambda k, xi: estimator.draw(k, xi.shape, xi.dtype))(keys, x)

    def make(p):
        return AugmentedProbabilityFlowODE(model, sde, p, divergence_mode, estimator)

    y0 = (x, jnp.zeros((x.shape[0], estimator.num_probes), x.dtype))
    (z, delta), nfe, num_steps, status, t_end = refill_solve(
        make, y0, probes, eps, sde.T, solver=opts.solver, rtol=opts.rtol, atol=opts.atol,
        slots=slots, max_steps=opts.max_steps, clock=opts.clock, sde=sde,
    )
    # status (1 finished, 2 max_steps, 3 non-finite, 4 stalled) as `_failures` codes
    code = jnp.asarray([OK, OK, MAX_STEPS, NONFINITE, STALLED], jnp.int32)[status]
    # log p_eps(x) = log p_T(z) + int_eps^T div F dt  (appendix D), one per probe
    logp = jax.vmap(sde.prior_logp)(z)[:, None] + delta
    failure = Failure(code, t_end)  # pyright: ignore[reportArgumentType]
    return logp, z, nfe, num_steps, input_failure(x, eps) | failure
