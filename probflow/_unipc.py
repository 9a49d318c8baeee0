"""UniPC (Zhao et al. 2023): a multistep predictor UniP-p and corrector UniC-p for the
probability-flow ODE, in data or noise prediction.

With h = lambda_t - lambda_s, hh = -h (data prediction, m = x0) or h (noise prediction,
m = eps), the previous points r_k = (lambda_{s_k} - lambda_s) / h and the divided differences
D_k = (m_{s_k} - m_s) / r_k, one step is (the paper's eq. 7 and Algorithm 2 with the B(h) of
section 3.3)

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) m_s - alpha_t B(h) sum_k rho_k D_k   (data)
    x_t = (alpha_t / alpha_s) x_s - sigma_t (e^hh - 1) m_s - sigma_t B(h) sum_k rho_k D_k   (noise)

where rho solves R rho = b with R_ik = r_k^(i-1), b_i = i! hh phi_{i+1}(hh) / B(h) (the order
conditions, eq. 8), B(h) = hh (bh1) or e^hh - 1 (bh2). The predictor UniP-p uses the p - 1
earlier points (rho = 1/2 for p = 2); the corrector UniC-p adds the model output at the predicted
x_t itself (r = 1; rho = 1/2 for p = 1), raising the order to p + 1. The corrected x_t is the
base of the next step, but its model output is not recomputed: the next predictor reuses the one
at the predicted x_t, so the corrector costs no evaluation.

As a diffrax solver the corrector of step i runs at the start of step i + 1, right after the
step's one evaluation (at the predicted x_i): the diffrax state is the predicted x, the corrected
one travels in the solver state. The last step's corrector, whose evaluation would be wasted,
is thus never run, and a solve of N steps costs exactly N evaluations, as in the reference code.

Reference: W. Zhao, L. Bai, Y. Rao, J. Zhou, J. Lu, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models", NeurIPS 2023.
"""

from __future__ import annotations

import diffrax
import jax.numpy as jnp

from ._dpm import AbstractExponentialIntegrator
from ._multistep import phi, plain_state, push, step_schedule
from ._sde import AbstractSDE
from ._time import AbstractClock, AbstractStepSchedule, as_clock

_VARIANTS = ("bh1", "bh2")
_PREDICTIONS = ("data", "noise")


def _coefficients(p: int, hh, b_h, rks, corrector: bool):
    """rho of UniP-p (`corrector=False`, p - 1 of them) or UniC-p (p of them), from the order
    conditions R rho = b (eq. 8); the reference code's closed forms for the smallest orders."""
    if corrector and p == 1:
        return jnp.full((1,), 0.5, hh.dtype)
    if not corrector and p == 2:
        return jnp.full((1,), 0.5, hh.dtype)
    r = jnp.concatenate([rks, jnp.ones((1,), hh.dtype)])
    factorial = jnp.cumprod(jnp.arange(1, p + 1, dtype=hh.dtype))  # i!
    b = jnp.stack([factorial[i - 1] * hh * phi(i + 1, hh) for i in range(1, p + 1)]) / b_h
    big_r = jnp.stack([r**i for i in range(p)])
    if not corrector:
        big_r, b = big_r[:-1, :-1], b[:-1]
    return jnp.linalg.solve(big_r, b)


class UniPC(AbstractExponentialIntegrator):
    """UniPC-p (Zhao et al. 2023): predictor UniP-p, corrector UniC-p; one evaluation a step.

    A solve of N steps costs N evaluations: the corrector reuses the next step's evaluation and
    is skipped on the last step. The first steps use the orders their history allows. Fixed
    steps only (`steps=N`); runs in time "t" or "log_snr"; the probability-flow ODE only (not
    `log_likelihood`).

    **Arguments:**

    - `order`: 1, 2 or 3 (default 3), the predictor's order; the corrector adds one.
    - `schedule`: the step schedule of `steps=N`: "sqrt_t" (uniform in sqrt(t), the
      default), "t", "log_snr", "edm" or an `AbstractStepSchedule` ("quadratic" and "time",
      the reference code's names, are deprecated aliases of "sqrt_t" and "t").
    - `variant`: "bh1" (B(h) = h; the paper's choice for unguided sampling at few steps, the
      default) or "bh2" (B(h) = e^h - 1, the paper's choice for guided sampling).
    - `prediction`: "data" (x0, as DPM-Solver++; the default) or "noise" (eps).
    - `lower_order_final`: the reference code's rule (default True): step i of N uses order at
      most N + 1 - i, which steadies few-step solves.
    - `sde`, `time`, `num_steps`: set by the solve (`bind`); leave them out.
    """

    solver_order: int
    schedule: AbstractStepSchedule
    variant: str
    prediction: str
    lower_order_final: bool
    sde: AbstractSDE | None
    time: AbstractClock
    num_steps: int | None

    def __init__(
        self,
        order: int = 3,
        schedule: str | AbstractStepSchedule = "sqrt_t",
        variant: str = "bh1",
        prediction: str = "data",
        lower_order_final: bool = True,
        *,
        sde=None,
        time="t",
        num_steps=None,
    ):
        self.solver_order = order
        self.schedule = step_schedule(schedule)
        self.variant = variant
        self.prediction = prediction
        self.lower_order_final = lower_order_final
        self.sde = sde
        self.time = as_clock(time)
        self.num_steps = num_steps

    def __check_init__(self):
        k = self.solver_order
        if isinstance(k, bool) or k not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3 for UniPC, got {k!r}")
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {self.variant!r}")
        if self.prediction not in _PREDICTIONS:
            raise ValueError(f"prediction must be 'data' or 'noise', got {self.prediction!r}")
        if not isinstance(self.lower_order_final, bool):
            raise ValueError(f"lower_order_final must be a bool, got {self.lower_order_final!r}")

    def _with(self, **kw):
        return UniPC(
            self.solver_order, self.schedule, self.variant, self.prediction,
            self.lower_order_final, **kw,
        )

    def evaluation_costs(self):
        return 0, 1, 1

    def _order_of_step(self, s):
        """The order of the reference code's step s (1-based): what the history allows, and
        with `lower_order_final` at most N + 1 - s."""
        p = jnp.minimum(s, self.solver_order)
        if self.lower_order_final and self.num_steps is not None:
            p = jnp.minimum(p, self.num_steps + 1 - s)
        return jnp.maximum(p, 1)

    def _update(self, x_s, t_s, lams, t_t, lam_t, ms, avail, p, m_t):
        """One UniP (m_t None) or UniC step of order p (traced, 1..order) from the point
        (x_s, lams[0]) with model outputs ms (newest first; `avail` of them real) to lam_t."""
        sde = self._sde()
        data = self.prediction == "data"
        a_s, s_s = sde.marginal(t_s)
        a_t, s_t = sde.marginal(t_t)
        h = lam_t - lams[0]
        hh = -h if data else h
        b_h = hh if self.variant == "bh1" else jnp.expm1(hh)
        # Unavailable history: stand-in points r = -k keep R invertible (never selected).
        ks = jnp.arange(1, lams.shape[0], dtype=h.dtype)
        safe_h = jnp.where(h == 0, 1.0, h)
        rks = jnp.where(ks < avail, (lams[1:] - lams[0]) / safe_h, -ks)
        d1s = (ms[1:] - ms[0]) / rks.reshape((-1,) + (1,) * (ms.ndim - 1))
        if data:
            base = (s_t / s_s) * x_s - a_t * jnp.expm1(hh) * ms[0]
            coef = a_t * b_h
        else:
            base = (a_t / a_s) * x_s - s_t * jnp.expm1(hh) * ms[0]
            coef = s_t * b_h
        out = base
        for q in range(1, self.solver_order + 1):
            rho = _coefficients(q, hh, b_h, rks[: q - 1], corrector=m_t is not None)
            res = jnp.zeros_like(x_s)
            for k in range(q - 1):
                res = res + rho[k] * d1s[k]
            if m_t is not None:
                res = res + rho[-1] * (m_t - ms[0])
            out = jnp.where(p == q, base - coef * res, out)
        return out

    def init(self, terms, t0, t1, y0, args):
        x = plain_state(y0, "UniPC")
        k = self.solver_order
        z = jnp.zeros((), x.dtype)
        hist = jnp.zeros((k,) + x.shape, x.dtype)
        return x, hist, jnp.zeros((k,), x.dtype), z, jnp.zeros((), jnp.int32)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        x = plain_state(y0, "UniPC")
        xc_prev, m_hist, lam_hist, t_prev, n = solver_state
        sign, c0, ta, tb, lam0, h, _, _ = self._interval(terms, t0, t1, y0)
        eps0, x00, _ = self._predict(terms, sign, c0, ta, y0, args)
        m0 = (x00 if self.prediction == "data" else eps0).astype(x.dtype)
        lam0 = jnp.asarray(lam0, x.dtype)
        # UniC of the previous step (the reference's step n), with this step's evaluation.
        xc = self._update(
            xc_prev, t_prev, lam_hist, ta, lam0, m_hist, n, self._order_of_step(n), m0
        )
        xc = jnp.where(n >= 1, xc, x).astype(x.dtype)
        # UniP of this step (the reference's step n + 1) from the corrected point.
        ms = jnp.concatenate([m0[None], m_hist])
        lams = jnp.concatenate([lam0[None], lam_hist])
        x1 = self._update(
            xc, ta, lams[:-1], tb, lam0 + h, ms[:-1], n + 1, self._order_of_step(n + 1), None
        ).astype(x.dtype)
        state = (xc, push(m_hist, m0), push(lam_hist, lam0), jnp.asarray(ta, x.dtype), n + 1)
        return x1, None, dict(y0=y0, y1=x1), state, diffrax.RESULTS.successful

