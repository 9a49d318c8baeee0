"""iPNDM (Zhang & Chen 2023, the improved PNDM of the DEIS paper): Adams-Bashforth on the noise
prediction in the variables of the VE form of the ODE.

With x~ = x / alpha and sigma = std / alpha = exp(-lambda), the probability-flow ODE of every
linear SDE is dx~/dsigma = eps(x, t) (Karras et al. 2022, eq. 4 with s = 1; Zhang & Chen 2023,
eq. 11), whose right side is the model's noise prediction. iPNDM steps it with the
constant-step Adams-Bashforth formulas of order 1 to 4 (Zhang & Chen 2023, eq. 26, the
warm-start "improved" PNDM: the first steps use the orders their history allows instead of
Runge-Kutta warm-up steps):

    x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) sum_j a_j eps_{i-j},
    a = (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24.

Reference: Q. Zhang, Y. Chen, "Fast Sampling of Diffusion Models with Exponential Integrator",
ICLR 2023.
"""

from __future__ import annotations

import diffrax
import jax.numpy as jnp

from ._dpm import AbstractExponentialIntegrator
from ._multistep import plain_state, push, step_schedule
from ._sde import AbstractSDE
from ._time import AbstractClock, AbstractStepSchedule, as_clock

# Adams-Bashforth weights of orders 1..4, newest evaluation first.
_AB = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


class IPNDM(AbstractExponentialIntegrator):
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth on the noise prediction in sigma =
    exp(-lambda); one evaluation a step, lower orders while the history fills.

    Its weights are the constant-step ones, which assume equal steps in sigma; on the usual
    schedules it converges at second order. Fixed steps only (`steps=N`); runs
    in time "t" or "log_snr"; the probability-flow ODE only (not `log_likelihood`).

    **Arguments:**

    - `order`: 1 to 4 (default 4), the largest Adams-Bashforth order.
    - `schedule`: the step schedule of `steps=N`: "sqrt_t" (uniform in sqrt(t), the
      default), "t", "log_snr", "edm" or an `AbstractStepSchedule` ("quadratic" and "time",
      the reference code's names, are deprecated aliases of "sqrt_t" and "t").
    - `sde`, `time`, `num_steps`: set by the solve (`bind`); leave them out.
    """

    solver_order: int
    schedule: AbstractStepSchedule
    sde: AbstractSDE | None
    time: AbstractClock
    num_steps: int | None

    def __init__(self, order: int = 4, schedule: str | AbstractStepSchedule = "sqrt_t", *,
                 sde=None, time="t",
                 num_steps=None):
        self.solver_order = order
        self.schedule = step_schedule(schedule)
        self.sde = sde
        self.time = as_clock(time)
        self.num_steps = num_steps

    def __check_init__(self):
        k = self.solver_order
        if isinstance(k, bool) or k not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4 for IPNDM, got {k!r}")

    def _with(self, **kw):
        return IPNDM(self.solver_order, self.schedule, **kw)

    def evaluation_costs(self):
        return 0, 1, 1

    def init(self, terms, t0, t1, y0, args):
        x = plain_state(y0, "IPNDM")
        hist = jnp.zeros((max(self.solver_order - 1, 1),) + x.shape, x.dtype)
        return hist, jnp.zeros((), jnp.int32)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        x = plain_state(y0, "IPNDM")
        hist, n = solver_state
        sde = self._sde()
        sign, c0, ta, tb, _, _, _, _ = self._interval(terms, t0, t1, y0)
        e0, _, _ = self._predict(terms, sign, c0, ta, y0, args)
        e0 = e0.astype(x.dtype)
        a0, s0 = sde.marginal(ta)
        a1, s1 = sde.marginal(tb)
        es = jnp.concatenate([e0[None], hist])
        slope = e0
        for q in range(2, self.solver_order + 1):
            ab = sum(w * es[j] for j, w in enumerate(_AB[q - 1]))
            slope = jnp.where(jnp.minimum(n + 1, self.solver_order) == q, ab, slope)
        # x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) slope, with x~ = x / alpha.
        x1 = ((a1 / a0) * x + a1 * (s1 / a1 - s0 / a0) * slope).astype(x.dtype)
        state = (push(hist, e0), n + 1)
        return x1, None, dict(y0=y0, y1=x1), state, diffrax.RESULTS.successful
