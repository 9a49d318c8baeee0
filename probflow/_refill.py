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

from ._failures import MAX_STEPS, NONFINITE, OK, STALLED, Failure
from ._nfe import Costs, select_initial_step
from ._options import ODEOptions, Refill
from ._sde import AbstractSDE

__all__ = ["count_refill_evaluations", "refill_solve"]


class _Reversed(eqx.Module):
    """F run backwards: dy/ds = -F(-s, y), so that a decreasing clock becomes increasing."""

    vector_field: Callable

    def __call__(self, s, y, args):
        out = self.vector_field(-s, y, args)
        return jtu.tree_map(lambda a: -a, out)


def count_refill_evaluations(costs: Costs, num_steps: Array) -> Array:
    """Vector-field evaluations of one example's solve in `refill_solve` that attempted
    `num_steps` steps: 2 for the initial step size, the solver's cost at initialisation, then its
    cost per later attempt for every attempt (`SolverTraits.costs`), the first included: an FSAL
    tableau's first stage is the initial selection's F(t0, y0), so no attempt pays it again."""
    init, _, later = costs
    num_steps = jnp.asarray(num_steps, jnp.int32)
    return (2 + init + later * num_steps).astype(jnp.int32)


def _leaves(tree) -> Array:
    return jnp.concatenate([jnp.ravel(a) for a in jtu.tree_leaves(tree)])


def _take(tree, idx):
    return jtu.tree_map(lambda a: a[idx], tree)


# The state of a slot after a step (see `_Stepper.step`; `_result` maps them to `_failures` codes).
_RUNNING, _FINISHED, _MAX_STEPS, _NONFINITE, _STALLED = 0, 1, 2, 3, 4


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
    out_status: Array  # [N] _RUNNING (or not started), _FINISHED, _MAX_STEPS, _NONFINITE,
    # _STALLED
    out_t: Array  # [N] the (increasing) clock's time where each example's solve ended


class _Stepper(eqx.Module):
    """One example's solve, one step at a time: diffrax's solver step and PID decision on that
    example alone, in the plan's clock (increasing: a falling clock is solved in -c)."""

    make_vector_field: Callable
    solver: diffrax.AbstractSolver
    controller: diffrax.PIDController
    clock_sign: float = eqx.field(static=True)
    opts: ODEOptions
    sde: AbstractSDE
    c0: Array
    c1: Array
    c1_floor: Array  # diffrax rounds a next time within 100 ULPs of t1 to t1

    def field(self, args):
        """Example `args`'s vector field in the (increasing) clock."""
        vf = self.opts.time.wrap(self.make_vector_field(args), self.sde)
        return vf if self.clock_sign > 0 else _Reversed(vf)

    def first_step(self, y, args):
        """(dt0, F(c0, y0)): the initial step size (2 evaluations), as the per-example solves."""
        o = self.opts
        return select_initial_step(self.field(args), y, self.c0, self.c1, o.rtol, o.atol,
                                   o.traits.step_order)

    def start(self, y, args, dt, f):
        """Solver and controller state of a fresh example."""
        term = diffrax.ODETerm(self.field(args))
        tnext = jnp.minimum(self.c0 + dt, self.c1)
        if self.opts.traits.fsal:
            # F(c0, y0) of the initial step selection is the first stage: no attempt pays it.
            solver_state = (jnp.asarray(False), f)
        else:
            solver_state = self.solver.init(term, self.c0, tnext, y, None)
        _, controller_state = self.controller.init(
            term, self.c0, tnext, y, dt, None, None,  # pyright: ignore[reportArgumentType]
            self.opts.traits.error_order,
        )
        return tnext, solver_state, jtu.tree_map(jnp.asarray, controller_state)

    def step(self, tprev, tnext, y, args, solver_state, controller_state, num_steps):
        """One iteration of diffrax's `_integrate.loop` body for one example; also its status."""
        term = diffrax.ODETerm(self.field(args))
        y1, y_error, _, new_solver_state, _ = self.solver.step(
            term, tprev, tnext, y, None, solver_state, False
        )
        y_error = jtu.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), y_error)
        keep, new_tprev, new_tnext, _, new_cstate, _ = self.controller.adapt_step_size(
            tprev, tnext, y, y1, None, y_error,
            self.opts.traits.error_order,  # pyright: ignore[reportArgumentType]  (adaptive)
            controller_state,
        )
        # A non-finite attempt ends the solve at its start (rather than being rejected until
        # max_steps); a next step below 16 ulps of t means the solve could never finish.
        finite = jnp.all(jnp.isfinite(_leaves(y1))) & jnp.isfinite(new_tnext)
        keep = keep & finite
        new_tprev = jnp.where(finite, new_tprev, tprev)
        eps = jnp.finfo(jnp.result_type(new_tprev)).eps
        stalled = new_tnext - new_tprev <= 16 * eps * jnp.abs(new_tprev)
        new_cstate = jtu.tree_map(jnp.asarray, new_cstate)
        new_tprev = jnp.minimum(new_tprev, self.c1)
        clip = new_tnext > self.c1_floor
        new_tnext = jnp.where(
            clip, jnp.where(keep, self.c1, new_tprev + 0.5 * (self.c1 - new_tprev)), new_tnext
        )
        sel = lambda a_, b_: jnp.where(keep, a_, b_)
        y = jtu.tree_map(sel, y1, y)
        solver_state = jtu.tree_map(sel, new_solver_state, solver_state)
        num_steps = (num_steps + 1).astype(jnp.int32)
        status = jnp.where(
            ~finite, _NONFINITE,
            jnp.where(new_tprev >= self.c1, _FINISHED, jnp.where(
                stalled, _STALLED,
                jnp.where(num_steps >= self.opts.max_steps, _MAX_STEPS, _RUNNING))),
        )
        return new_tprev, new_tnext, y, solver_state, new_cstate, num_steps, status


def _stepper(make_vector_field, opts: ODEOptions, sde, t0, t1, dtype) -> _Stepper:
    """The stepper of a solve from t0 to t1 (in t) in the plan's clock."""
    clock = opts.time
    c0, c1 = clock.static_to_clock(sde, t0), clock.static_to_clock(sde, t1)
    sign = -1.0 if c1 < c0 else 1.0  # e.g. log-SNR falls with t: solve in -c, where it rises
    solver = opts.solver
    if opts.traits.needs_binding:
        solver = solver.bind(sde, clock, None)  # pyright: ignore[reportAttributeAccessIssue]
    c1a = jnp.asarray(sign * c1, dtype)
    c1_floor = c1a
    for _ in range(100):
        c1_floor = eqx.internal.prevbefore(c1_floor)
    return _Stepper(
        make_vector_field=make_vector_field, solver=solver,
        controller=diffrax.PIDController(rtol=opts.rtol, atol=opts.atol), clock_sign=sign,
        opts=opts, sde=sde, c0=jnp.asarray(sign * c0, dtype), c1=c1a, c1_floor=c1_floor,
    )


def _refill(st: _Slots, stepped, stepper: _Stepper, y0, args, dt0, f0) -> _Slots:
    """Write the finished examples out and start the next ones of the queue in their slots."""
    tprev, tnext, y, solver_state, cstate, num_steps, status = stepped
    n = st.out_steps.shape[0]
    active = st.index < n
    done = active & (status != _RUNNING)
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
    ny, na = _take(y0, safe), _take(args, safe)
    ntnext, nsolver, ncontroller = jax.vmap(stepper.start)(ny, na, dt0[safe], _take(f0, safe))
    pick = lambda new, old: jax.vmap(lambda f, a_, b_: jnp.where(f, a_, b_))(fresh, new, old)
    return _Slots(
        index=new_index,
        tprev=jnp.where(fresh, stepper.c0, tprev),
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


def _result(status: Array, t: Array) -> Failure:
    """The `_failures.Failure` of each example from its final status and end time `t` (in t)."""
    codes = jnp.asarray([OK, OK, MAX_STEPS, NONFINITE, STALLED], jnp.int32)
    return Failure(codes[status], t)  # pyright: ignore[reportArgumentType]


def refill_solve(
    make_vector_field: Callable,
    y0: PyTree,
    args: PyTree,
    t0: float,
    t1: float,
    opts: ODEOptions,
    *,
    sde: AbstractSDE,
):
    """Solve dy/dt = F_i(t, y) from t0 to t1 for N independent examples in the plan's slots.

    `make_vector_field(args_i)` returns example i's vector field `F_i(t, y, args)` (diffrax
    convention, args unused), any vector field; `y0` and `args` are pytrees with a leading axis
    N. `opts` is the plan (adaptive, `scheduler=Refill(slots)` resolved): its solver,
    tolerances, `max_steps`, traits and `time`, the clock (`_time.py`) which maps [t0, t1] to its
    own variable and wraps the field; `sde` is the probability-flow ODE's SDE (for the clock and
    the exponential integrators). Returns `(y1, nfe, num_steps, failure)` with leading axis N;
    `failure` is each example's `_failures.Failure`: its code (OK; MAX_STEPS; NONFINITE for a
    non-finite attempted step, which ends the solve at once; STALLED for a step size collapsed
    below the resolution of t) and the time t (not the clock's) where its solve ended, as
    `solve_flow` returns it.
    """
    n = jtu.tree_leaves(y0)[0].shape[0]
    dtype = jtu.tree_leaves(y0)[0].dtype
    scheduler = opts.scheduler
    assert isinstance(scheduler, Refill) and isinstance(scheduler.slots, int)
    s = min(scheduler.slots, n)
    stepper = _stepper(make_vector_field, opts, sde, t0, t1, dtype)
    # The first step of every example, batched (2 evaluations each).
    dt0, f0 = jax.vmap(stepper.first_step)(y0, args)
    first = jnp.arange(s)
    tnext, solver_state, controller_state = jax.vmap(stepper.start)(
        _take(y0, first), _take(args, first), dt0[:s], _take(f0, first)
    )
    state = _Slots(
        index=first.astype(jnp.int32),
        tprev=jnp.full((s,), stepper.c0),
        tnext=tnext,
        y=_take(y0, first),
        args=_take(args, first),
        solver_state=solver_state,
        controller_state=controller_state,
        num_steps=jnp.zeros((s,), jnp.int32),
        queue=jnp.asarray(s, jnp.int32),
        out_y=jtu.tree_map(jnp.zeros_like, y0),
        out_steps=jnp.zeros((n,), jnp.int32),
        out_status=jnp.zeros((n,), jnp.int32),
        out_t=jnp.zeros((n,), dtype),
    )

    def body(st: _Slots) -> _Slots:
        stepped = jax.vmap(stepper.step)(
            st.tprev, st.tnext, st.y, st.args, st.solver_state, st.controller_state,
            st.num_steps,
        )
        return _refill(st, stepped, stepper, y0, args, dt0, f0)

    final = jax.lax.while_loop(lambda st: jnp.any(st.index < n), body, state)
    nfe = count_refill_evaluations(opts.traits.costs, final.out_steps)
    t_end = opts.time.to_time(sde, stepper.clock_sign * final.out_t)
    return final.out_y, nfe, final.out_steps, _result(final.out_status, t_end)
