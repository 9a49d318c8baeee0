"""Exponential integrators and log-SNR time for the probability-flow ODE.

The ODE dx/dt = f(t) x - 1/2 g(t)^2 score(t, x) (Song et al. 2021, eq. 13) is semi-linear. With
alpha = scale(t), sigma = std(t) and lambda = log(alpha / sigma) (the half log-SNR), and using
g^2 = d sigma^2/dt - 2 f sigma^2, its exact solution from s to t is (Lu et al. 2022, eq. 3.4)

    x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lam_s}^{lam_t} e^{-lambda} eps(x, lambda) dlambda

with the noise prediction eps = -sigma score, or in data-prediction form (Lu et al. 2022b, eq. 8)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lam_s}^{lam_t} e^{lambda} x0(x, lambda) dlambda

with x0 = (x + sigma^2 score) / alpha. DPM-Solver-k Taylor-expands eps in lambda (single step, k
evaluations per step); DPM-Solver++ multistep expands x0 and reuses earlier evaluations (one
evaluation per step).

References: C. Lu, Y. Zhou, F. Bao, J. Chen, C. Li, J. Zhu, "DPM-Solver: A Fast ODE Solver for
Diffusion Probabilistic Model Sampling in Around 10 Steps", NeurIPS 2022 ("Lu et al. 2022");
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022
("Lu et al. 2022b").

The solvers are diffrax solvers. diffrax wraps every term (and flips time when integrating
backwards), so they use nothing but the term's vector field: the score is recovered from the ODE's
right side, score = 2 (f x - F) / g^2, with the SDE bound in by probflow (`bind`). The state is x,
or (x, delta) for the likelihood ODE, whose delta = int div F dt is integrated alongside: its linear
part D log(alpha_t / alpha_s) exactly, the rest, d/dlambda = sigma^2 div score, by a quadrature in
lambda of the same order on the same evaluations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._nfe import AbstractCountedSolver
from ._sde import AbstractSDE
from ._time import (
    AbstractClock,
    AbstractStepSchedule,
    LinearTime,
    LogSNRTime,
    as_clock,
    as_schedule,
    static_log_snr,
)
from ._time import LogSNRTimeODE as LogSNRTimeODE
from ._time import SqrtTimeODE as SqrtTimeODE

# Kept for importers of the old names; the clocks and schedules live in `_time.py`.
log_snr_of = static_log_snr


def _schedule(schedule) -> AbstractStepSchedule:
    """The step schedule of a `schedule=` argument (None is not one)."""
    out = as_schedule(schedule)
    if out is None:
        raise ValueError("schedule must be one of the schedule names or a step schedule, got None")
    return out


def schedule_times(schedule, sde: AbstractSDE, t0: float, t1: float, steps: int, dtype) -> Array:
    """steps + 1 times from t0 to t1 (either direction) on `schedule` (see `_time.as_schedule`)."""
    return _schedule(schedule).times(sde, t0, t1, steps, dtype)


# --------------------------------------------------------------------------- the integrators


class AbstractExponentialIntegrator(diffrax.AbstractSolver, AbstractCountedSolver):
    """A DPM-Solver-type integrator of the probability-flow ODE, bound to its SDE by probflow.

    Subclasses have fields `solver_order` (the constructor's `order`), `schedule` (a
    `_time.AbstractStepSchedule`), `sde` (None until bound) and `time` (the solve's clock, a
    `_time.AbstractClock`).
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    if TYPE_CHECKING:  # the subclasses' fields (eqx cannot take string AbstractVars here)
        solver_order: int
        schedule: AbstractStepSchedule
        sde: AbstractSDE | None
        time: AbstractClock
        num_steps: int | None

        def _with(self, **kw) -> AbstractExponentialIntegrator: ...

    def order(self, terms):
        """The order of the solution; with steps=None also that of the error estimate."""
        return self.solver_order

    def bind(self, sde: AbstractSDE, time: str | AbstractClock = "t",
             num_steps: int | None = None):
        """This solver for the probability-flow ODE of `sde`, run in clock `time` (a clock, or
        its name); `num_steps` is the number of steps of a fixed-step solve (None when adaptive)."""
        return self._with(sde=sde, time=self.check_clock(as_clock(time)), num_steps=num_steps)

    @property
    def clocks(self) -> tuple[type[AbstractClock], ...]:
        """t and log-SNR time (see `check_clock`)."""
        return (LinearTime, LogSNRTime)

    @property
    def refill_clocks(self) -> tuple[type[AbstractClock], ...]:
        """The refill scheduler steps the adaptive integrators in t."""
        return (LinearTime,) if self.supports_adaptive else ()

    @property
    def needs_binding(self) -> bool:
        return True

    def step_schedule(self) -> AbstractStepSchedule:
        return self.schedule

    def check_clock(self, clock: AbstractClock) -> AbstractClock:
        """The clocks these integrators run in: t and log-SNR time (their steps are exact in
        lambda whatever the clock; sqrt(t) adds nothing but a change of variable)."""
        if not isinstance(clock, (LinearTime, LogSNRTime)):
            raise ValueError(
                f"time={clock.name!r} is for diffrax solvers; the exponential integrators run in "
                "t or log-SNR time (time='t' or 'log_snr')"
            )
        return clock

    def step_times(self, sde: AbstractSDE, t0: float, t1: float, steps: int, dtype) -> Array:
        """The `steps` + 1 times (in t) of a fixed-step solve, from `self.schedule`."""
        return self.schedule.times(sde, t0, t1, steps, dtype)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    # -- helpers shared by the single-step and multistep forms

    def _sde(self) -> AbstractSDE:
        if self.sde is None:
            raise ValueError(
                f"{type(self).__name__} must be bound to an SDE: pass it as solver= to probflow's "
                "sample_ode/encode/decode/log_likelihood, or call solver.bind(sde) first"
            )
        return self.sde

    def _clock(self, terms, t0, t1):
        """diffrax integrates in +solver time; the control's sign says the real direction."""
        sign = jnp.where(jnp.asarray(terms.contr(t0, t1)) < 0, -1, 1).astype(jnp.result_type(t0))
        return sign

    def _at_clock(self, c):
        """(t, lambda) at clock time c."""
        return self.time.time_and_log_snr(self._sde(), c)

    def _at_log_snr(self, lam):
        """(t, clock time) at log-SNR lam."""
        return self.time.time_and_clock_of_log_snr(self._sde(), lam)

    def _interval(self, terms, t0, t1, y0):
        """What every step needs about its interval: the clock's sign, the start on the clock c0,
        the times ta, tb, the start log-SNR lam0 and the step h in log-SNR, and the state split
        into x and the divergence integral (None for a plain solve)."""
        sign = self._clock(terms, t0, t1)
        c0, c1 = sign * t0, sign * t1
        (ta, lam0), (tb, lam1) = self._at_clock(c0), self._at_clock(c1)
        x = y0[0] if isinstance(y0, tuple) else y0
        delta = y0[1] if isinstance(y0, tuple) else None
        return sign, c0, ta, tb, lam0, lam1 - lam0, x, delta

    def _predict(self, terms, sign, c, t, y, args) -> tuple[Array, Array, Any]:
        """One model evaluation at clock time c (real time t): (eps, x0, q).

        score = 2 (f x - F) / g^2 from the ODE's right side F (eq. 13); eps = -sigma score
        (Lu et al. 2022, eq. 2.4), x0 = (x + sigma^2 score) / alpha (Lu et al. 2022b, eq. 5); q =
        sigma^2 div score, the non-linear part of d delta/dlambda (None without delta).
        """
        sde = self._sde()
        v = terms.vf(sign * c, y, args)
        x, vx, vd = (y[0], v[0], v[1]) if isinstance(y, tuple) else (y, v, None)
        f = sde.drift_coef(t)
        g2 = sde.diffusion(t) ** 2
        alpha, sigma = sde.marginal(t)
        if not isinstance(self.time, LinearTime):  # v = F dt/dc
            dt_dc = self.time.dt_dc(sde, t)
            vx = vx / dt_dc
            vd = None if vd is None else vd / dt_dc
        score = 2.0 * (f * x - vx) / g2
        q = None if vd is None else 2.0 * sigma**2 * (f * x.size - vd) / g2
        eps = -sigma * score
        x0 = (x + sigma**2 * score) / alpha
        return eps, x0, q

    @staticmethod
    def _pack(y0, x1, delta1):
        if isinstance(y0, tuple):
            return (x1.astype(y0[0].dtype), delta1.astype(y0[1].dtype))
        return x1.astype(y0.dtype)


def _phi1(h):
    """(e^h - 1) / h - 1, guarded at h = 0 (zero-length steps)."""
    safe = jnp.where(h == 0, 1.0, h)
    return jnp.where(h == 0, 0.0, jnp.expm1(safe) / safe - 1.0)


class DPMSolver(AbstractExponentialIntegrator):
    """DPM-Solver-1/2/3 (Lu et al. 2022): single-step, noise prediction; `order` evaluations a step.

    `steps=N` steps on `schedule` ("sqrt_t", the default: uniform in sqrt(t), the fewest NFE in
    our measurements; "log_snr": uniform in lambda, the paper's choice; "t"; or a step
    schedule object; the DPM-Solver code's names "quadratic" and "time" are kept as aliases). With
    `steps=None`, orders 2 and 3 are adaptive: DPM-Solver-12 and -23 (Lu et al. 2022, section 4
    and appendix C), the error being the difference with the embedded lower-order solution,
    controlled by rtol/atol.
    """

    solver_order: int
    schedule: AbstractStepSchedule
    sde: AbstractSDE | None
    time: AbstractClock
    num_steps: int | None

    def __init__(
        self,
        order: int = 2,
        schedule: str | AbstractStepSchedule = "sqrt_t",
        *,
        sde=None,
        time="t",
        num_steps=None,
    ):
        self.solver_order = order
        self.schedule = _schedule(schedule)
        self.sde = sde
        self.time = as_clock(time)
        self.num_steps = num_steps

    def __check_init__(self):
        k = self.solver_order
        if isinstance(k, bool) or k not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3 for DPMSolver, got {k!r}")

    @property
    def supports_adaptive(self) -> bool:
        return self.solver_order >= 2

    def _with(self, **kw):
        return DPMSolver(self.solver_order, self.schedule, **kw)

    def evaluation_costs(self):
        return 0, self.solver_order, self.solver_order  # every attempt evaluates every stage

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        k = self.solver_order
        sde = self._sde()
        sign, c0, ta, tb, lam0, h, x, delta = self._interval(terms, t0, t1, y0)
        a0, _ = sde.marginal(ta)
        a1, s1 = sde.marginal(tb)
        e0, _, q0 = self._predict(terms, sign, c0, ta, y0, args)
        em1 = jnp.expm1(h)
        # DPM-Solver-1 (eq. 3.7); delta: D log(alpha_t / alpha_s) exactly + h q (Euler in lambda).
        x_1 = (a1 / a0) * x - s1 * em1 * e0
        d_lin = x.size * (jnp.log(a1) - jnp.log(a0)) if delta is not None else None
        if k == 1:
            d1 = None if delta is None else delta + d_lin + h * q0
            dense = dict(y0=y0, y1=self._pack(y0, x_1, d1))
            return dense["y1"], None, dense, None, diffrax.RESULTS.successful

        def stage(r, xs):
            lam = lam0 + r * h
            t, c = self._at_log_snr(lam)
            ys = (xs, delta) if delta is not None else xs
            return self._predict(terms, sign, c, t, ys, args)

        # DPM-Solver-2 (Lu et al. 2022, Algorithm 4, r1 = 1/2), or its r1 = 1/3 variant inside -3.
        r1 = 0.5 if k == 2 else 1.0 / 3.0
        ts1, _ = self._at_log_snr(lam0 + r1 * h)
        a_s1, sg_s1 = sde.marginal(ts1)
        u1 = (a_s1 / a0) * x - sg_s1 * jnp.expm1(r1 * h) * e0
        e1, _, q1 = stage(r1, u1)
        x_2 = x_1 - s1 / (2.0 * r1) * em1 * (e1 - e0)
        if delta is not None:
            # Quadrature in lambda on the nodes 0 and r1, exact for linear q.
            d_2 = delta + d_lin + h * ((1.0 - 0.5 / r1) * q0 + 0.5 / r1 * q1)
            d_1 = delta + d_lin + h * q0
        if k == 2:
            y1, y_lo = (
                self._pack(y0, x_2, d_2 if delta is not None else None),
                self._pack(y0, x_1, d_1 if delta is not None else None),
            )
        else:
            # DPM-Solver-3 (Lu et al. 2022, Algorithm 5, r1 = 1/3, r2 = 2/3).
            r2 = 2.0 / 3.0
            ts2, _ = self._at_log_snr(lam0 + r2 * h)
            a_s2, sg_s2 = sde.marginal(ts2)
            u2 = (
                (a_s2 / a0) * x
                - sg_s2 * jnp.expm1(r2 * h) * e0
                - sg_s2 * (r2 / r1) * _phi1(r2 * h) * (e1 - e0)
            )
            e2, _, q2 = stage(r2, u2)
            x_3 = x_1 - s1 / r2 * _phi1(h) * (e2 - e0)
            # Quadrature on the nodes 0, 1/3, 2/3 exact for quadratics: weights 1/4, 0, 3/4.
            d_3 = None if delta is None else delta + d_lin + h * (0.25 * q0 + 0.75 * q2)
            y1 = self._pack(y0, x_3, d_3)
            y_lo = self._pack(y0, x_2, d_2 if delta is not None else None)
        y_err = jax.tree_util.tree_map(lambda a, b: a - b, y1, y_lo)
        dense = dict(y0=y0, y1=y1)
        return y1, y_err, dense, None, diffrax.RESULTS.successful


class DPMSolverMultistep(AbstractExponentialIntegrator):
    """DPM-Solver++(2M)/(3M) (Lu et al. 2022b): multistep, data prediction; one evaluation a step.

    The first steps use the orders their history allows (1, then 2). Fixed steps only
    (`steps=N`), on `schedule` ("sqrt_t", the default, "t" or "log_snr", as `DPMSolver`).
    """

    solver_order: int
    schedule: AbstractStepSchedule
    lower_order_final: bool
    sde: AbstractSDE | None
    time: AbstractClock
    num_steps: int | None

    def __init__(
        self,
        order: int = 2,
        schedule: str | AbstractStepSchedule = "sqrt_t",
        lower_order_final: bool = True,
        *,
        sde=None,
        time="t",
        num_steps=None,
    ):
        self.solver_order = order
        self.schedule = _schedule(schedule)
        self.lower_order_final = lower_order_final
        self.sde = sde
        self.time = as_clock(time)
        self.num_steps = num_steps

    def __check_init__(self):
        k = self.solver_order
        if isinstance(k, bool) or k not in (2, 3):
            raise ValueError(f"order must be 2 or 3 for DPMSolverMultistep, got {k!r}")
        if not isinstance(self.lower_order_final, bool):
            raise ValueError(f"lower_order_final must be a bool, got {self.lower_order_final!r}")

    def _with(self, **kw):
        return DPMSolverMultistep(self.solver_order, self.schedule, self.lower_order_final, **kw)

    def evaluation_costs(self):
        return 0, 1, 1

    def init(self, terms, t0, t1, y0, args):
        x = y0[0] if isinstance(y0, tuple) else y0
        dtype = x.dtype
        hist = jnp.zeros((2,) + x.shape, dtype)
        q_shape = jnp.shape(y0[1]) if isinstance(y0, tuple) else ()  # delta: one per probe
        q_hist = jnp.zeros((2,) + q_shape, dtype)
        return hist, q_hist, jnp.zeros((2,), dtype), jnp.zeros((), jnp.int32)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        k = self.solver_order
        sde = self._sde()
        m_prev, q_prev, lam_prev, n = solver_state
        sign, c0, ta, tb, lam0, h, x, delta = self._interval(terms, t0, t1, y0)
        _, s0 = sde.marginal(ta)
        a1, s1 = sde.marginal(tb)
        _, m0, q0 = self._predict(terms, sign, c0, ta, y0, args)
        q0_ = jnp.zeros((), x.dtype) if q0 is None else q0.astype(x.dtype)
        phi1 = jnp.expm1(-h)
        # First order (DPM-Solver++1, Lu et al. 2022b eq. 9 with x0 held constant).
        x_1 = (s1 / s0) * x - a1 * phi1 * m0
        dq_1 = q0_
        # Second order, multistep (Lu et al. 2022b, Algorithm 2): r0 = h_{i-1} / h_i.
        r0 = jnp.where(n >= 1, (lam0 - lam_prev[0]) / h, 1.0)
        d1_0 = (m0 - m_prev[0]) / r0
        x_2 = x_1 - 0.5 * a1 * phi1 * d1_0
        a = (q0_ - q_prev[0]) / r0  # Adams-Bashforth in lambda for delta, same history
        dq_2 = q0_ + 0.5 * a
        if k == 3:
            # Third order: the reference code's multistep_dpm_solver_third_update (dpmsolver++).
            r1 = jnp.where(n >= 2, (lam_prev[0] - lam_prev[1]) / h, 1.0)
            d1_1 = (m_prev[0] - m_prev[1]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            x_3 = x_1 + a1 * phi2 * d1 - 2.0 * a1 * phi3 * d2
            b = (a - (q_prev[0] - q_prev[1]) / r1) / (r0 + r1)
            dq_3 = q0_ + 0.5 * a + b * (1.0 / 3.0 + 0.5 * r0)
        else:
            x_3, dq_3 = x_2, dq_2
        use = jnp.minimum(n + 1, k)  # the orders the history allows
        if self.lower_order_final and self.num_steps is not None and self.num_steps < 15:
            # The reference code's lower_order_final: order 1 on the last step, at most 2 on the
            # one before, which steadies few-step solves ending at a small eps.
            use = jnp.minimum(use, self.num_steps - n)
        x1 = jnp.where(use <= 1, x_1, jnp.where(use == 2, x_2, x_3))
        dq = jnp.where(use <= 1, dq_1, jnp.where(use == 2, dq_2, dq_3))
        d1 = None
        if delta is not None:
            a0, _ = sde.marginal(ta)
            d1 = delta + x.size * (jnp.log(a1) - jnp.log(a0)) + h * dq
        y1 = self._pack(y0, x1, d1)
        state = (
            jnp.stack([m0.astype(x.dtype), m_prev[0]]),
            jnp.stack([q0_, q_prev[0]]),
            jnp.stack([jnp.asarray(lam0, x.dtype), lam_prev[0]]),
            n + 1,
        )
        return y1, None, dict(y0=y0, y1=y1), state, diffrax.RESULTS.successful
