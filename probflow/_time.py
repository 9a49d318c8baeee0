"""Clocks and step schedules for solving the probability-flow ODE.

A *clock* is the variable c(t) a solve runs in: t itself, the half log-SNR
lambda = log(scale / std), or u = sqrt(t). It maps t to c and back, wraps a vector field F(t, y)
into dy/dc = F(t(c), y) dt/dc, and lays N steps uniform in c.

A *step schedule* gives the N + 1 times (in t) of a fixed-step solve; any fixed-step solver,
diffrax's or probflow's exponential integrators, takes one. `UniformSchedule(clock)` is uniform in
a clock; `EDMSchedule` is the schedule of Karras et al. 2022 (eq. 5, rho = 7), uniform in
sigma^(1/rho) with sigma = std / scale = exp(-lambda).

Strings ("t", "log_snr", "sqrt_t", the one name of each clock; the DPM-Solver code's schedule
names "time" and "quadratic" are kept as aliases of "t" and "sqrt_t") are
accepted by the public functions only, and turned into these objects once by `as_clock` and
`as_schedule`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._sde import AbstractSDE


def static_log_snr(sde: AbstractSDE, t: float) -> float:
    """lambda(t) as a Python float (a solve's end points are static)."""
    with jax.ensure_compile_time_eval():
        return float(
            sde.log_snr(jnp.asarray(t, jnp.result_type(float)))  # float64 with jax_enable_x64
        )


class LogSNRTimeODE(eqx.Module):
    """A vector field F(t, y) in log-SNR time: dy/dlambda = F(t(lambda), y) dt/dlambda.

    dlambda/dt = f - (d sigma^2/dt) / (2 sigma^2) = -g^2 / (2 sigma^2) for these linear SDEs, so
    dt/dlambda = -2 sigma^2 / g^2. Works for the plain and the augmented (likelihood) ODE.
    """

    vector_field: Callable
    sde: AbstractSDE

    def __call__(self, lam, y, args):
        t = self.sde.time_of_log_snr(lam)
        _, std = self.sde.marginal(t)
        dt_dlam = -2.0 * std**2 / self.sde.diffusion(t) ** 2
        out = self.vector_field(t, y, args)
        return jax.tree_util.tree_map(lambda a: (dt_dlam * a).astype(a.dtype), out)


class SqrtTimeODE(eqx.Module):
    """A vector field F(t, y) in u = sqrt(t): dy/du = 2 u F(u^2, y).

    Near t = 0 the VP and VE stds grow like sqrt(t), so the score and F vary on a sqrt(t) scale
    and adaptive solvers in t reject many of their first steps; in u the field is smooth.
    """

    vector_field: Callable

    def __call__(self, u, y, args):
        out = self.vector_field(u * u, y, args)
        return jax.tree_util.tree_map(lambda a: (2.0 * u * a).astype(a.dtype), out)


# --------------------------------------------------------------------------- clocks


class AbstractClock(eqx.Module):
    """The variable c(t) a solve runs in."""

    name: eqx.AbstractClassVar[str]  # the public string for this clock

    @abc.abstractmethod
    def to_clock(self, sde: AbstractSDE, t) -> Array:
        """c(t) (arrays)."""

    @abc.abstractmethod
    def to_time(self, sde: AbstractSDE, c) -> Array:
        """t(c) (arrays)."""

    @abc.abstractmethod
    def static_to_clock(self, sde: AbstractSDE, t: float) -> float:
        """c(t) for a static end point, as a Python float."""

    @abc.abstractmethod
    def dt_dc(self, sde: AbstractSDE, t) -> Array:
        """dt/dc at time t."""

    @abc.abstractmethod
    def wrap(self, vector_field: Callable, sde: AbstractSDE) -> Callable:
        """The vector field F(t, y) as dy/dc = F(t(c), y) dt/dc."""

    def time_and_log_snr(self, sde: AbstractSDE, c):
        """(t, lambda) at clock time c."""
        t = self.to_time(sde, c)
        return t, sde.log_snr(t)

    def time_and_clock_of_log_snr(self, sde: AbstractSDE, lam):
        """(t, c) at log-SNR lam."""
        t = sde.time_of_log_snr(lam)
        return t, self.to_clock(sde, t)

    def grid(self, sde: AbstractSDE, t0: float, t1: float, steps: int, dtype) -> Array:
        """steps + 1 times (in t) from t0 to t1, uniform in this clock; the ends exact."""
        cs = jnp.linspace(
            self.static_to_clock(sde, t0), self.static_to_clock(sde, t1), steps + 1, dtype=dtype
        )
        ts = self.to_time(sde, cs).astype(dtype)
        return ts.at[0].set(t0).at[-1].set(t1)


class LinearTime(AbstractClock):
    """c = t."""

    name: ClassVar[str] = "t"

    def to_clock(self, sde, t):
        return t

    def to_time(self, sde, c):
        return c

    def static_to_clock(self, sde, t):
        return float(t)

    def dt_dc(self, sde, t):
        return jnp.ones_like(t)

    def wrap(self, vector_field, sde):
        return vector_field

    def grid(self, sde, t0, t1, steps, dtype):
        ts = jnp.linspace(t0, t1, steps + 1, dtype=dtype)
        return ts.at[0].set(t0).at[-1].set(t1)


class LogSNRTime(AbstractClock):
    """c = lambda = log(scale / std), the half log-SNR (Lu et al. 2022)."""

    name: ClassVar[str] = "log_snr"

    def to_clock(self, sde, t):
        return sde.log_snr(t)

    def to_time(self, sde, c):
        return sde.time_of_log_snr(c)

    def static_to_clock(self, sde, t):
        return static_log_snr(sde, t)

    def dt_dc(self, sde, t):
        _, std = sde.marginal(t)
        return -2.0 * std**2 / sde.diffusion(t) ** 2

    def wrap(self, vector_field, sde):
        return LogSNRTimeODE(vector_field, sde)

    def time_and_log_snr(self, sde, c):
        return sde.time_of_log_snr(c), c

    def time_and_clock_of_log_snr(self, sde, lam):
        return sde.time_of_log_snr(lam), lam


class SqrtTime(AbstractClock):
    """c = sqrt(t) (the DPM-Solver code's "time_quadratic")."""

    name: ClassVar[str] = "sqrt_t"

    def to_clock(self, sde, t):
        return jnp.sqrt(t)

    def to_time(self, sde, c):
        return c * c

    def static_to_clock(self, sde, t):
        return math.sqrt(t)

    def dt_dc(self, sde, t):
        return 2.0 * jnp.sqrt(t)

    def wrap(self, vector_field, sde):
        return SqrtTimeODE(vector_field)

    def grid(self, sde, t0, t1, steps, dtype):
        ts = jnp.linspace(math.sqrt(t0), math.sqrt(t1), steps + 1, dtype=dtype) ** 2
        return ts.at[0].set(t0).at[-1].set(t1)


# --------------------------------------------------------------------------- step schedules


class AbstractStepSchedule(eqx.Module):
    """The times of a fixed-step solve."""

    @abc.abstractmethod
    def times(self, sde: AbstractSDE, t0: float, t1: float, steps: int, dtype) -> Array:
        """steps + 1 times (in t) from t0 to t1 (either direction), the ends exact."""

    def check_steps(self, steps: int) -> None:
        """A one-line ValueError if this schedule cannot lay `steps` steps (default: it can)."""

    def clock_times(self, sde, clock: AbstractClock, t0: float, t1: float, steps: int, dtype):
        """The same times on `clock` (what a solve in that clock steps to), the ends exact."""
        ts = self.times(sde, t0, t1, steps, dtype)
        c0, c1 = clock.static_to_clock(sde, t0), clock.static_to_clock(sde, t1)
        return clock.to_clock(sde, ts).astype(dtype).at[0].set(c0).at[-1].set(c1)


class UniformSchedule(AbstractStepSchedule):
    """Steps uniform in a clock."""

    clock: AbstractClock

    def times(self, sde, t0, t1, steps, dtype):
        return self.clock.grid(sde, t0, t1, steps, dtype)

    def clock_times(self, sde, clock, t0, t1, steps, dtype):
        if clock == self.clock:  # uniform in the solve's own clock: no round trip through t
            c0, c1 = clock.static_to_clock(sde, t0), clock.static_to_clock(sde, t1)
            return jnp.linspace(c0, c1, steps + 1, dtype=dtype).at[0].set(c0).at[-1].set(c1)
        return super().clock_times(sde, clock, t0, t1, steps, dtype)


class EDMSchedule(AbstractStepSchedule):
    """Karras et al. 2022, eq. (5): sigma_i^(1/rho) uniform, sigma = std / scale = exp(-lambda).

    rho = 7 puts most steps at small noise, where the score changes fastest.
    """

    rho: float = 7.0

    def __check_init__(self):
        if isinstance(self.rho, bool) or not (
            isinstance(self.rho, (int, float)) and self.rho > 0
        ):
            raise ValueError(f"rho must be a positive number, got {self.rho!r}")

    def times(self, sde, t0, t1, steps, dtype):
        inv = 1.0 / self.rho
        s0 = math.exp(-static_log_snr(sde, t0) * inv)  # sigma^(1/rho) at the ends
        s1 = math.exp(-static_log_snr(sde, t1) * inv)
        lams = -self.rho * jnp.log(jnp.linspace(s0, s1, steps + 1, dtype=dtype))
        ts = sde.time_of_log_snr(lams).astype(dtype)
        return ts.at[0].set(t0).at[-1].set(t1)


# --------------------------------------------------------------------------- the public edge

_CLOCKS = {"t": LinearTime, "log_snr": LogSNRTime, "sqrt_t": SqrtTime}
# Deprecated aliases: the DPM-Solver code's schedule names ("quadratic": uniform in sqrt(t)).
_SCHEDULE_ALIASES = {"time": LinearTime, "quadratic": SqrtTime}


def as_clock(time, name: str = "time") -> AbstractClock:
    """A clock from a clock or one of "t", "log_snr", "sqrt_t"."""
    if isinstance(time, AbstractClock):
        return time
    if isinstance(time, str) and time in _CLOCKS:
        return _CLOCKS[time]()
    raise ValueError(
        f"{name} must be one of {tuple(_CLOCKS)} or a clock (pf.LinearTime(), pf.LogSNRTime(), "
        f"pf.SqrtTime()), got {time!r}"
    )


def as_schedule(schedule, name: str = "schedule") -> AbstractStepSchedule | None:
    """A step schedule from a schedule, a clock (uniform in it), None, "edm", or one of the
    clock names ("t", "log_snr", "sqrt_t"; "time" and "quadratic" as deprecated aliases)."""
    if schedule is None or isinstance(schedule, AbstractStepSchedule):
        return schedule
    if isinstance(schedule, AbstractClock):
        return UniformSchedule(schedule)
    if isinstance(schedule, str):
        if schedule == "edm":
            return EDMSchedule()
        cls = _CLOCKS.get(schedule) or _SCHEDULE_ALIASES.get(schedule)
        if cls is not None:
            return UniformSchedule(cls())
    raise ValueError(
        f"{name} must be one of {('edm',) + tuple(_CLOCKS)} or a step "
        f"schedule (pf.UniformSchedule(clock), pf.EDMSchedule()), got {schedule!r}"
    )
