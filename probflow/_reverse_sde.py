"""The reverse-time SDE (Song et al. 2021, eq. 6) solved with diffrax SDE solvers.

    dx = [f(t) x - g(t)^2 score(t, x)] dt + g(t) dw_bar,  from t = T down to t = eps.

The drift is an `ODETerm`, the diffusion a `ControlTerm` driven by the Brownian motion (fixed
steps: exact independent increments per step, `UnsafeBrownianPath`; adaptive steps: a
`VirtualBrownianTree`, consistent across rejected steps, without its host callback); the
noise is additive (g does not depend on x), so every diffrax SDE solver applies, including the
stochastic Runge--Kutta methods for additive noise (SRA1, ShARK, SEA). The solve runs forward in
the reversed time s = T - t, from 0 to T - eps:

    dx = -[f(t) x - g(t)^2 score(t, x)] ds + g(t) dw_s,  t = T - s,

which is eq. (6) with w_s the reverse-time Brownian motion. (diffrax 0.7's stochastic
Runge--Kutta solvers ignore the sign of the step when t0 > t1 and integrate the drift forwards,
so probflow never asks diffrax to run an SDE backwards.)

As in `_flow.py`, the public function validates in Python and then calls one `eqx.filter_jit`-ed
function that vmaps a single-example solve: each example has its own Brownian path (its own key)
and, with adaptive stepping, its own step sizes, so a sample never depends on the rest of the
batch.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import PRNGKeyArray

from ._brownian import UncheckedBrownianTree
from ._failures import (
    Failure,
    FixedSteps,
    GuardedController,
    code_of_result,
    raise_if_failed,
)
from ._nfe import evaluations
from ._options import UNSET, SDEOptions, pc_options, sde_options
from ._pc import (
    AbstractCorrector,
    AbstractPredictor,
    PredictorCorrector,
    ScoreVectorField,
    solve_pc,
)
from ._results import SampleResult
from ._sde import AbstractSDE
from ._validate import (
    check_eps,
    check_model,
    check_positive_int,
    check_sde,
    check_shape,
)


class ReverseSDEDrift(eqx.Module):
    """The drift of the reverse SDE in reversed time s = T - t: -[f(t) x - g(t)^2 score(t, x)]."""

    model: Callable
    sde: AbstractSDE

    def __call__(self, s, y, args):
        del args
        t = self.sde.T - s
        g2 = self.sde.diffusion(t) ** 2
        return -(self.sde.drift_coef(t) * y - g2 * self.model(t, y)).astype(y.dtype)


class ReverseSDEDiffusion(eqx.Module):
    """The diffusion of the reverse SDE in reversed time s = T - t, g(t) I (eq. 6)."""

    sde: AbstractSDE

    def __call__(self, s, y, args):
        del args
        g = self.sde.diffusion(self.sde.T - s)
        return lx.DiagonalLinearOperator(jnp.full(y.shape, g, y.dtype))


def _levy_area(solver) -> type:
    """The cheapest Brownian path information the solver needs (increments, or Levy area)."""
    while isinstance(solver, diffrax.HalfSolver):  # the wrapped solver draws the path
        solver = solver.solver
    # Stochastic Runge--Kutta methods state what they need; the others use increments only.
    minimal = (solver.minimal_levy_area if isinstance(solver, diffrax.AbstractSRK)
               else diffrax.AbstractBrownianIncrement)
    for cls in (diffrax.BrownianIncrement, diffrax.SpaceTimeLevyArea,
                diffrax.SpaceTimeTimeLevyArea):
        if issubclass(cls, minimal):
            return cls
    raise ValueError(f"solver={type(solver).__name__} needs an unsupported Levy area {minimal}")


def solve_reverse_sde(model: Callable, sde: AbstractSDE, x_T, key, eps: float, opts: SDEOptions):
    """One example of the reverse SDE from T to eps; returns (x_eps, nfe, num_steps, failure).

    The solve stops at the first non-finite state (`_failures`), with the failure's time in t.
    """
    dtype = x_T.dtype
    s_end = float(sde.T) - float(eps)  # reversed time s = T - t runs from 0 to T - eps
    shape = jax.ShapeDtypeStruct(x_T.shape, dtype)
    levy_area = _levy_area(opts.solver)
    if opts.steps is None:  # adaptive
        pid = diffrax.PIDController(rtol=opts.rtol, atol=opts.atol)
        # The first step goes to the controller, not to diffeqsolve (whose check of a traced dt0
        # is a host callback).
        controller = GuardedController(  # pyright: ignore[reportCallIssue]
            pid, jnp.asarray(s_end / 64, dtype)  # pyright: ignore[reportCallIssue]
        )
        # Rejected steps revisit parts of the path: the tree keeps them consistent (evaluated
        # without its range check, a host callback: `_brownian.py`).
        brownian = UncheckedBrownianTree(diffrax.VirtualBrownianTree(
            0.0, s_end, tol=s_end * 2.0**-16, shape=shape, key=key, levy_area=levy_area
        ))
        adjoint = diffrax.RecursiveCheckpointAdjoint()
    else:
        steps = opts.steps + 1  # pyright: ignore[reportOptionalOperand]
        controller = FixedSteps(jnp.linspace(0.0, s_end, steps, dtype=dtype))
        # Every step asks once for its own increment (and Levy area), which are independent
        # Gaussians over disjoint steps: drawn exactly, per step, with no tree to descend.
        brownian = diffrax.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy_area)
        adjoint = diffrax.ForwardMode()  # the path is not for reverse-mode differentiation
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(ReverseSDEDrift(model, sde)),
        diffrax.ControlTerm(ReverseSDEDiffusion(sde), brownian),
    )
    sol = diffrax.diffeqsolve(
        terms,
        opts.solver,
        t0=jnp.asarray(0.0, dtype),
        t1=jnp.asarray(s_end, dtype),
        dt0=None,
        y0=x_T,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        max_steps=opts.max_steps,
        adjoint=adjoint,
        throw=False,
    )
    x = sol.ys[-1]  # pyright: ignore[reportOptionalSubscript]  (SaveAt(t1=True))
    num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
    # No SDE solver here is FSAL: every attempt costs the same (one attempt per "first step").
    nfe = evaluations(opts.traits.costs, num_steps, 1, adaptive=False)
    t_end = sde.T - sol.ts[-1]  # pyright: ignore[reportOptionalSubscript]
    failure = Failure(code_of_result(sol.result), t_end)
    return x, nfe, num_steps, failure


@eqx.filter_jit
def _sample_sde(model, sde, keys, shape, dtype, eps, opts):
    check_model(model, shape, dtype)  # once per trace
    def one(key):
        k_prior, k_path = jax.random.split(key)
        x_T = sde.prior_sample(k_prior, shape, dtype)
        return solve_reverse_sde(model, sde, x_T, k_path, eps, opts)

    return jax.vmap(one)(keys)


def sample_sde(
    model: Callable,
    sde: AbstractSDE,
    num_samples: int,
    shape: tuple[int, ...],
    *,
    key: PRNGKeyArray,
    solver: diffrax.AbstractSolver | None = None,
    steps: int | None = UNSET,
    eps: float = 1e-3,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    dtype=None,
    options: SDEOptions | None = None,
) -> SampleResult:
    """`num_samples` samples by solving the reverse-time SDE (eq. 6) from the prior at T to eps.

    `r.nfe` counts the score evaluations of every stage of every attempted step.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `num_samples`: how many samples.
    - `shape`: the shape of one example.
    - `key`: the PRNG key (prior draws and Brownian paths, one per sample).
    - `solver`: any supported diffrax SDE solver (default `diffrax.Euler()`, i.e.
      Euler--Maruyama; also EulerHeun, Heun, Midpoint, Ralston, ReversibleHeun, the Milstein
      methods and the stochastic Runge--Kutta methods SEA, SRA1, ShARK, GeneralShARK, SPaRK,
      SlowRK).
    - `steps`: N uniform steps (not given: 1000), or None to adapt the step size with a PID
      controller at `rtol`/`atol` (Heun, ReversibleHeun, SRA1, ShARK or SPaRK).
    - `eps`: the smallest time, where the solve ends (default 1e-3).
    - `rtol`, `atol`, `max_steps`: as in `pf.SDEOptions` (which owns their defaults); not given
      (None): the default.
    - `dtype`: the samples' dtype (default: JAX's default float).
    - `options`: a `pf.SDEOptions` plan instead of `solver`, `steps`, `rtol`, `atol` and
      `max_steps` (both at once: ValueError).

    **Returns:** `SampleResult` with `x`, `nfe` and `num_steps`.
    """
    sde = check_sde(sde)
    num_samples = check_positive_int(num_samples, "num_samples")
    shape = check_shape(shape)
    eps = check_eps(eps, sde)
    opts = sde_options(options, solver=solver, steps=steps,
                       rtol=rtol, atol=atol, max_steps=max_steps)
    dtype = jnp.result_type(float) if dtype is None else dtype
    keys = jax.random.split(key, num_samples)
    x, nfe, num_steps, failure = _sample_sde(model, sde, keys, shape, dtype, eps, opts)
    raise_if_failed(failure, what="reverse-SDE solve (sample_sde)", direction=-1,
                    max_steps=opts.max_steps)
    return SampleResult(x=x, nfe=nfe, num_steps=num_steps)


# --------------------------------------------------------------------------- predictor-corrector


@eqx.filter_jit
def _sample_pc(model, sde, keys, shape, dtype, eps, steps, predictor, corrector, denoise):
    check_model(model, shape, dtype)  # once per trace
    terms = diffrax.ODETerm(ScoreVectorField(model))
    solver = PredictorCorrector(sde, predictor, corrector)

    def one(key):
        k_prior, k_chain = jax.random.split(key)
        x_T = sde.prior_sample(k_prior, shape, dtype)
        return solve_pc(terms, solver, x_T, k_chain, steps=steps, eps=eps, denoise=denoise)

    return jax.vmap(one)(keys)


def sample_pc(
    model: Callable,
    sde: AbstractSDE,
    num_samples: int,
    shape: tuple[int, ...],
    *,
    key: PRNGKeyArray,
    predictor: AbstractPredictor | None = None,
    corrector: AbstractCorrector | None = UNSET,
    steps: int | None = None,
    eps: float = 1e-3,
    denoise: bool | None = None,
    dtype=None,
    options: SDEOptions | None = None,
) -> SampleResult:
    """`num_samples` samples by predictor-corrector sampling (Algorithms 2, 3).

    `steps` noise levels uniform in t from T down to eps; at each, one predictor step to the
    next level, then `corrector.steps` Langevin steps there (none for `corrector=None`). With
    `denoise`, the result is Tweedie's E[x_0 | x_eps], one more evaluation. `r.nfe` per example is
    steps * (1 + corrector.steps) + denoise: PC1000 with one corrector step spends 2001.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `num_samples`: how many samples.
    - `shape`: the shape of one example.
    - `key`: the PRNG key (prior draws and the chains' noise).
    - `predictor`: `pf.ReverseDiffusionPredictor()` (not given: the default),
      `pf.EulerMaruyamaPredictor()` or `pf.AncestralSamplingPredictor()`.
    - `corrector`: `pf.LangevinCorrector(snr=0.16, steps=1)` (not given: the default),
      `pf.AnnealedLangevinCorrector(...)`, or None for no corrector.
    - `steps`: the number of noise levels (not given: 1000).
    - `eps`: the smallest time (default 1e-3).
    - `denoise`: end with Tweedie's denoising step (not given: True).
    - `dtype`: the samples' dtype (default: JAX's default float).
    - `options`: a `pf.SDEOptions` plan instead of `predictor`, `corrector`, `steps` and
      `denoise` (both at once: ValueError).

    **Returns:** `SampleResult` with `x`, `nfe` and `num_steps`.
    """
    opts, sde, eps, steps = pc_options(options, sde, eps, predictor=predictor,
                                       corrector=corrector, steps=steps, denoise=denoise)
    num_samples = check_positive_int(num_samples, "num_samples")
    shape = check_shape(shape)
    dtype = jnp.result_type(float) if dtype is None else dtype
    keys = jax.random.split(key, num_samples)
    x, nfe, num_steps, failure = _sample_pc(
        model, sde, keys, shape, dtype, eps, steps, opts.predictor, opts.corrector, opts.denoise
    )
    raise_if_failed(failure, what="predictor-corrector sampling (sample_pc)", direction=-1)
    return SampleResult(x=x, nfe=nfe, num_steps=num_steps)
