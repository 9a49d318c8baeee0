"""A multistep exponential integrator whose per-step coefficients are tuned to one model.

DPM-Solver++ steps the data-prediction form of the probability-flow ODE (Lu et al. 2022b, eq. 8)
with a polynomial extrapolation of the model's data prediction m_i = x0(x_i, t_i) over log-SNR:

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i,          (1)
    D_i = m_i + 1 / (2 r_i) (m_i - m_{i-1})      (2M: Lu et al. 2022b, Algorithm 2),

h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1} / h_i. The polynomial is exact for a data prediction
that is polynomial in lambda, which a trained network is not; at five to ten steps the solver's
error is dominated by that mismatch. `TunedSolver` keeps (1) and learns D_i's coefficients per
step, as the learned-solver methods do (Shaul et al. 2024, "Bespoke Solvers"; Frankel et al.
2025, "S4S"):

    D_i = (1 + g_i) m_i + sum_{j=1..H} (b_ij + d_ij) (m_i - m_{i-j}),                  (2)

b the DPM-Solver++(2M) coefficients above (with its lower order on the last step of short
solves), g and d the tuned corrections (`pf.tune_solver`). With g = d = 0 it is
DPM-Solver++(2M). One model evaluation per step, as 2M.
"""

from __future__ import annotations

import diffrax
import jax.numpy as jnp
from jaxtyping import Array

from ._dpm import AbstractExponentialIntegrator
from ._multistep import plain_state, push, step_schedule
from ._sde import AbstractSDE
from ._time import AbstractClock, AbstractStepSchedule, as_clock


class TunedSolver(AbstractExponentialIntegrator):
    """DPM-Solver++(2M) with per-step coefficients tuned to one model (eq. 2 of the module's
    docstring); made by `pf.tune_solver` or `pf.load_solver`.

    Fixed steps only, exactly as many as it was tuned for (`steps=N`), on the schedule it was
    tuned with; time "t" or "log_snr"; the probability-flow ODE only. The coefficients are for
    decoding (T to eps: `decode`, `sample_ode`); `encode` with it runs DPM-Solver++(2M) on the
    same times reversed.

    **Arguments:**

    - `coefficients`: an [N, H + 1] array: column 0 the scale corrections g_i of the data
      prediction, columns 1..H the corrections d_ij of its differences with the j-th earlier
      one (zero: DPM-Solver++(2M)).
    - `schedule`: the step schedule of its N steps (a `pf.TunedSchedule` when tuned).
    - `sde`, `time`, `num_steps`: set by the solve (`bind`); leave them out.
    """

    coefficients: Array
    schedule: AbstractStepSchedule
    solver_order: int
    sde: AbstractSDE | None
    time: AbstractClock
    num_steps: int | None

    def __init__(self, coefficients, schedule: str | AbstractStepSchedule = "sqrt_t", *,
                 sde=None, time="t", num_steps=None):
        self.coefficients = jnp.asarray(coefficients)
        self.schedule = step_schedule(schedule)
        self.solver_order = 2
        self.sde = sde
        self.time = as_clock(time)
        self.num_steps = num_steps

    def __check_init__(self):
        c = self.coefficients
        if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"coefficients must be an [N, H + 1] array, got shape {c.shape}")
        if not jnp.issubdtype(c.dtype, jnp.floating):
            raise ValueError(f"coefficients must be floating point, got {c.dtype}")
        if self.num_steps is not None:
            self.check_steps(self.num_steps)

    def check_steps(self, steps: int) -> None:
        if steps != self.coefficients.shape[0]:
            raise ValueError(
                f"steps={steps} does not match this TunedSolver, tuned for "
                f"steps={self.coefficients.shape[0]}"
            )

    @property
    def steps(self) -> int:
        """N, the number of steps it was tuned for."""
        return int(self.coefficients.shape[0])

    @property
    def history(self) -> int:
        """H, the number of earlier evaluations each step combines."""
        return int(self.coefficients.shape[1]) - 1

    def _with(self, **kw):
        return TunedSolver(self.coefficients, self.schedule, **kw)

    def evaluation_costs(self):
        return 0, 1, 1

    def init(self, terms, t0, t1, y0, args):
        x = plain_state(y0, "TunedSolver")
        h = max(self.history, 1)
        return (jnp.zeros((h,) + x.shape, x.dtype), jnp.zeros((h,), x.dtype),
                jnp.zeros((), jnp.int32))

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        x = plain_state(y0, "TunedSolver")
        m_prev, lam_prev, n = solver_state
        sde = self._sde()
        sign, c0, ta, tb, lam0, h, _, _ = self._interval(terms, t0, t1, y0)
        _, s0 = sde.marginal(ta)
        a1, s1 = sde.marginal(tb)
        _, m0, _ = self._predict(terms, sign, c0, ta, y0, args)
        m0 = m0.astype(x.dtype)
        steps = self.steps
        # DPM-Solver++(2M)'s coefficient, first order on the first step and (as its reference
        # code's lower_order_final, below 15 steps) on the last.
        r = jnp.where(n >= 1, (lam0 - lam_prev[0]) / h, 1.0)
        last = (n >= steps - 1) if steps < 15 else jnp.zeros((), bool)
        b1 = jnp.where((n >= 1) & ~last, 0.5 / r, 0.0)
        # The tuned corrections apply when decoding (sign < 0: T to eps), the direction they
        # were tuned in.
        row = jnp.where(sign < 0, self.coefficients[jnp.minimum(n, steps - 1)], 0.0)
        row = row.astype(x.dtype)
        d = (1.0 + row[0]) * m0 + b1 * (m0 - m_prev[0])  # eq. (2)
        for j in range(1, self.history + 1):
            d = d + jnp.where(n >= j, row[j], 0.0) * (m0 - m_prev[j - 1])
        x1 = ((s1 / s0) * x - a1 * jnp.expm1(-h) * d).astype(x.dtype)  # eq. (1)
        state = (push(m_prev, m0), push(lam_prev, jnp.asarray(lam0)), n + 1)
        return x1, None, dict(y0=y0, y1=x1), state, diffrax.RESULTS.successful

