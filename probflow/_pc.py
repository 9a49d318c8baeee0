"""Predictor-corrector sampling (Song et al. 2021, section 4.2, appendix G) as a diffrax solver.

`PredictorCorrector` is a `diffrax.AbstractSolver`. Its one step from noise level t to t_next < t
is a predictor step (a discretisation of the reverse SDE, eq. 6) followed by `corrector.steps`
Langevin steps at t_next (score-based MCMC targeting p_{t_next}): the order of the paper's
Algorithms 2 and 3. (The reference code runs the corrector first at each level; see
docs/samplers.md.)

The score reaches the solver as its term: diffrax wraps every term before handing it to a solver
(to flip time when t0 > t1), so a solver can only use the term interface, `vf` and `contr`. The
score is `term.vf(t, x, args)` of an `ODETerm`, or the sum of the vector fields of a `MultiTerm`
(eq. 14: score(x, t) + grad_x log p_t(y | x) for controllable generation), and the real, signed
time step is `term.contr(t0, t1)`, from which the solver recovers the direction of time. `args`
is the example's PRNG key; the step counter in the solver state is folded into it, so every step
of every example draws fresh noise. An optional `projection(t, x, key) -> x`, applied after every
predictor and corrector update, is the hook for inpainting-style constraints.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractClassVar, AbstractVar
from jaxtyping import Array, PRNGKeyArray, Scalar

from ._failures import (
    NONFINITE,
    OK,
    Failure,
    FixedSteps,
    all_finite,
    code_of_result,
)
from ._sde import VESDE, VPSDE, AbstractSDE
from ._validate import (
    check_eps,
    check_positive_float,
    check_positive_int,
    check_sde,
)

ScoreFn = Callable[[Scalar, Array], Array]
Projection = Callable[[Scalar, Array, PRNGKeyArray], Array]


def _forward_transition(sde: AbstractSDE, t, t_next):
    """(a, G^2) of the forward step x_t = a x_{t_next} + G z, exact for the linear SDE.

    a = scale(t) / scale(t_next) and G^2 = std(t)^2 - a^2 std(t_next)^2. For VP this is DDPM's
    x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i = 1 - exp(-int beta) (appendix
    B); for VE it is SMLD's x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z.
    """
    scale, std = sde.marginal(t)
    scale_next, std_next = sde.marginal(t_next)
    a = scale / scale_next
    g2 = jnp.maximum(std**2 - (a * std_next) ** 2, 0.0)
    return a, g2


# --------------------------------------------------------------------------- predictors


class AbstractPredictor(eqx.Module):
    """One step of a discretised reverse-time SDE from noise level t down to t_next < t."""

    # Score evaluations per step.
    num_evaluations: AbstractClassVar[int]

    def check_sde(self, sde: AbstractSDE) -> None:
        """Raise ValueError if the predictor is not defined for `sde` (default: any SDE)."""

    @abc.abstractmethod
    def step(
        self, score: ScoreFn, sde: AbstractSDE, t: Scalar, t_next: Scalar, x: Array,
        key: PRNGKeyArray,
    ) -> tuple[Array, Array]:
        """Returns (x_next, x_next_mean): the new state and its noise-free part."""


class ReverseDiffusionPredictor(AbstractPredictor):
    """Reverse diffusion (appendix E): x <- x - f_i(x) + G_i^2 s(x, t_i) + G_i z.

    f_i(x) = (a - 1) x and G_i come from the forward step between the two levels,
    x_t = a x_{t_next} + G z, taken exact for the linear SDE (`_forward_transition`).
    """

    num_evaluations: ClassVar[int] = 1

    def step(self, score, sde, t, t_next, x, key):
        a, g2 = _forward_transition(sde, t, t_next)
        x_mean = (2.0 - a) * x + g2 * score(t, x)
        z = jax.random.normal(key, x.shape, x.dtype)
        return (x_mean + jnp.sqrt(g2) * z).astype(x.dtype), x_mean.astype(x.dtype)


class EulerMaruyamaPredictor(AbstractPredictor):
    """Euler--Maruyama on the reverse SDE (eq. 6), dt = t_next - t < 0:
    x <- x + [f(t) x - g(t)^2 s(x, t)] dt + g(t) sqrt(|dt|) z."""

    num_evaluations: ClassVar[int] = 1

    def step(self, score, sde, t, t_next, x, key):
        dt = t_next - t
        g = sde.diffusion(t)
        x_mean = x + (sde.drift_coef(t) * x - g**2 * score(t, x)) * dt
        z = jax.random.normal(key, x.shape, x.dtype)
        return (x_mean + g * jnp.sqrt(-dt) * z).astype(x.dtype), x_mean.astype(x.dtype)


class ProbabilityFlowPredictor(AbstractPredictor):
    """An Euler step of the probability-flow ODE (eq. 13), dt = t_next - t < 0, no noise:
    x <- x + [f(t) x - 1/2 g(t)^2 s(x, t)] dt (the "probability flow" rows of Table 1)."""

    num_evaluations: ClassVar[int] = 1

    def step(self, score, sde, t, t_next, x, key):
        del key
        g2 = sde.diffusion(t) ** 2
        x_mean = (x + (sde.drift_coef(t) * x - 0.5 * g2 * score(t, x)) * (t_next - t))
        return x_mean.astype(x.dtype), x_mean.astype(x.dtype)


class AncestralSamplingPredictor(AbstractPredictor):
    """Ancestral sampling (appendix F), defined for VE (SMLD) and VP (DDPM) only.

    VP (eq. 47): x <- (x + beta_i s(x, t_i)) / sqrt(1 - beta_i) + sqrt(beta_i) z, with
    1 - beta_i = (scale(t_i) / scale(t_{i-1}))^2.
    VE (eq. 46): x <- x + (sigma_i^2 - sigma_{i-1}^2) s(x, sigma_i)
                   + sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2) z,
    with sigma_i the marginal std at t_i (the exact posterior q(x_{i-1} | x_i, x_0)).
    """

    num_evaluations: ClassVar[int] = 1

    def check_sde(self, sde):
        if not isinstance(sde, (VPSDE, VESDE)):
            raise ValueError(
                f"predictor=AncestralSamplingPredictor() is defined for VESDE (SMLD) and VPSDE "
                f"(DDPM) only (paper appendix F), got sde={type(sde).__name__}; use "
                "ReverseDiffusionPredictor() or EulerMaruyamaPredictor() instead"
            )

    def step(self, score, sde, t, t_next, x, key):
        z = jax.random.normal(key, x.shape, x.dtype)
        s = score(t, x)
        if isinstance(sde, VPSDE):
            a, beta = _forward_transition(sde, t, t_next)  # a^2 = 1 - beta for VP
            x_mean = (x + beta * s) / a
            noise_std = jnp.sqrt(beta)
        else:
            _, std = sde.marginal(t)
            _, std_next = sde.marginal(t_next)
            d2 = std**2 - std_next**2
            x_mean = x + d2 * s
            noise_std = jnp.sqrt(std_next**2 * d2 / std**2)
        return (x_mean + noise_std * z).astype(x.dtype), x_mean.astype(x.dtype)


# --------------------------------------------------------------------------- correctors


def _check_corrector_fields(snr, steps) -> None:
    check_positive_float(snr, "snr")
    check_positive_int(steps, "steps")


class AbstractCorrector(eqx.Module):
    """`steps` Langevin MCMC steps at one noise level t (Algorithms 4 and 5):

        x <- x + eps s(x, t) + sqrt(2 eps) z,   z ~ N(0, I),

    with a step size eps that depends on t only (never on the state or the noise; see
    `step_size` and docs/samplers.md for why).
    """

    snr: AbstractVar[float]
    steps: AbstractVar[int]

    def check_sde(self, sde: AbstractSDE) -> None:
        """Raise ValueError if the corrector is not defined for `sde` (default: any SDE)."""

    @abc.abstractmethod
    def step_size(self, sde: AbstractSDE, t: Scalar, alpha: Scalar) -> Scalar:
        """The Langevin step size eps at time t; alpha = 1 - beta_i (VP, sub-VP), 1 (VE)."""

    def correct(
        self, score: ScoreFn, sde: AbstractSDE, t: Scalar, alpha: Scalar, x: Array,
        key: PRNGKeyArray, projection: Projection | None = None,
    ) -> Array:
        """Run `steps` Langevin steps at time t; `projection` after each (inpainting hook)."""
        step = self.step_size(sde, t, alpha).astype(x.dtype)

        def body(j, x):
            kz, kp = jax.random.split(jax.random.fold_in(key, j))
            z = jax.random.normal(kz, x.shape, x.dtype)
            x = (x + step * score(t, x) + jnp.sqrt(2.0 * step) * z).astype(x.dtype)
            if projection is not None:
                x = projection(t, x, kp)
            return x

        return jax.lax.fori_loop(0, self.steps, body, x)


def _expected_norm_step(snr: float, sde: AbstractSDE, t, alpha):
    """eps = 2 alpha (r E||z|| / E||s||)^2 with both norms replaced by their expectations.

    E||z||^2 = d for the Langevin noise, and E||grad log p_0t(x_t | x_0)||^2 = d / std(t)^2 for
    the score of the perturbation kernel (the training target, eq. 7), whose mean square bounds
    the Fisher information of p_t from above. The dimension cancels: eps = 2 alpha (r std(t))^2.
    """
    _, std = sde.marginal(t)
    return 2.0 * alpha * (snr * std) ** 2


class LangevinCorrector(AbstractCorrector):
    """Langevin corrector (Algorithms 4, 5): eps = 2 alpha_i (r ||z|| / ||s||)^2 with the norms
    replaced by their expectations, so eps = 2 alpha_i (r std(t))^2 for every sample: also the
    annealed Langevin dynamics of NCSN (Song & Ermon 2019), hence `AnnealedLangevinCorrector`.

    Per-sample norms make eps depend on the state and the noise, which biases the chain (badly in
    low dimensions); batch-averaged norms (the reference code) couple the samples of a batch.
    """

    snr: float = 0.16
    steps: int = 1

    def __check_init__(self):
        _check_corrector_fields(self.snr, self.steps)

    def step_size(self, sde, t, alpha):
        return _expected_norm_step(self.snr, sde, t, alpha)


# Annealed Langevin dynamics (Song & Ermon 2019, NCSN; the reference code's
# `AnnealedLangevinDynamics`) steps by eps = 2 alpha_i (r std(t))^2, which is exactly the step of
# `LangevinCorrector` with expected norms (docs/samplers.md): one computation, two names.
AnnealedLangevinCorrector = LangevinCorrector


# --------------------------------------------------------------------------- the solver


class ScoreVectorField(eqx.Module):
    """A score model as a diffrax vector field: (t, y, args) -> model(t, y)."""

    model: Callable

    def __call__(self, t, y, args):
        del args
        return self.model(t, y)


def _score_terms(terms) -> tuple:
    return tuple(terms.terms) if isinstance(terms, diffrax.MultiTerm) else (terms,)


class PredictorCorrector(diffrax.AbstractSolver):
    """Predictor-corrector sampling (Algorithms 2, 3) as a diffrax solver.

    `terms`: an `ODETerm` whose vector field is the score, or a `MultiTerm` of such terms whose
    vector fields add up to the score. Integrate from T down to eps with `_failures.FixedSteps`;
    pass the example's PRNG key as `args`. Each step: predictor from t to t_next, then the
    corrector at t_next. Score evaluations per step: predictor.num_evaluations + corrector.steps.
    """

    sde: AbstractSDE
    predictor: AbstractPredictor
    corrector: AbstractCorrector | None = None
    projection: Projection | None = None

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def __check_init__(self):
        if not isinstance(self.predictor, AbstractPredictor):
            raise ValueError(
                f"predictor must be a probflow predictor such as ReverseDiffusionPredictor(), "
                f"got {type(self.predictor).__name__}"
            )
        if self.corrector is not None and not isinstance(self.corrector, AbstractCorrector):
            raise ValueError(
                f"corrector must be a probflow corrector such as LangevinCorrector(), or None, "
                f"got {type(self.corrector).__name__}"
            )

    @property
    def evaluations_per_step(self) -> int:
        extra = 0 if self.corrector is None else self.corrector.steps
        return self.predictor.num_evaluations + extra

    def order(self, terms):
        return None

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        return jnp.zeros((), jnp.int32)  # the step counter

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        score_terms = _score_terms(terms)
        dt = score_terms[0].contr(t0, t1)  # the real, signed time step (t1 - t0 inside diffrax)
        direction = jnp.sign(dt)
        t, t_next = direction * t0, direction * t1  # real times, t_next < t

        def score(time, x):
            # The wrapped terms multiply their time by the direction again.
            out = score_terms[0].vf(direction * time, x, args)
            for term in score_terms[1:]:
                out = out + term.vf(direction * time, x, args)
            return out.astype(x.dtype)

        key = jax.random.fold_in(args, solver_state)
        k_pred, k_proj, k_corr = jax.random.split(key, 3)
        x, _ = self.predictor.step(score, self.sde, t, t_next, y0, k_pred)
        if self.projection is not None:
            x = self.projection(t_next, x, k_proj)
        if self.corrector is not None:
            # alpha_i = 1 - beta_i = (scale(t) / scale(t_next))^2: the VP / sub-VP discretised
            # betas of the step just taken; 1 for VE (Algorithms 4, 5).
            a, _ = _forward_transition(self.sde, t, t_next)
            x = self.corrector.correct(score, self.sde, t_next, a**2, x, k_corr, self.projection)
        dense_info = dict(y0=y0, y1=x)
        return x, None, dense_info, solver_state + 1, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        """The score at (t0, y0) (the vector field of the terms)."""
        score_terms = _score_terms(terms)
        out = score_terms[0].vf(t0, y0, args)
        for term in score_terms[1:]:
            out = out + term.vf(t0, y0, args)
        return out


def tweedie_denoise(score: ScoreFn, sde: AbstractSDE, t, x: Array) -> Array:
    """E[x_0 | x_t] = (x_t + std(t)^2 score(x_t, t)) / scale(t) (Tweedie's formula)."""
    scale, std = sde.marginal(t)
    return ((x + std**2 * score(t, x)) / scale).astype(x.dtype)


def solve_pc(
    terms: diffrax.AbstractTerm,
    solver: PredictorCorrector,
    x_T: Array,
    key: PRNGKeyArray,
    *,
    steps: int,
    eps: float,
    denoise: bool,
):
    """PC sampling of one example from x_T at time T down to eps; returns
    (x, nfe, num_steps, failure).

    `terms` carry the score (see `PredictorCorrector`); `steps` uniform noise levels; with
    `denoise`, one more score evaluation maps x_eps to Tweedie's E[x_0 | x_eps] (counted in nfe).
    Sampling stops at the first step whose state is non-finite (`_failures.FixedSteps`).
    """
    sde = solver.sde
    dtype = x_T.dtype
    ts = jnp.linspace(float(sde.T), float(eps), steps + 1, dtype=dtype)
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=x_T,
        args=key,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=FixedSteps(ts),
        max_steps=steps,
        throw=False,
    )
    x = sol.ys[-1]  # pyright: ignore[reportOptionalSubscript]  (SaveAt(t1=True))
    num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
    nfe = num_steps * solver.evaluations_per_step
    if denoise:
        score_terms = _score_terms(terms)

        def score(t, y):
            out = score_terms[0].vf(t, y, key)
            for term in score_terms[1:]:
                out = out + term.vf(t, y, key)
            return out

        x = tweedie_denoise(score, sde, ts[-1], x)
        nfe = nfe + 1
    t_end = sol.ts[-1]  # pyright: ignore[reportOptionalSubscript]
    failure = Failure(code_of_result(sol.result), t_end)
    last = Failure(jnp.where(all_finite(x), OK, NONFINITE).astype(jnp.int32), ts[-1])
    return x, nfe.astype(jnp.int32), num_steps, failure | last


def check_pc_options(sde, predictor, corrector, steps, eps):
    """Validate sample_pc's options (shared with the controllable samplers)."""
    sde = check_sde(sde)
    eps = check_eps(eps, sde)
    steps = check_positive_int(steps, "steps")
    if not isinstance(predictor, AbstractPredictor):
        raise ValueError(
            "predictor must be a probflow predictor object: ReverseDiffusionPredictor(), "
            f"EulerMaruyamaPredictor() or AncestralSamplingPredictor(), got {predictor!r}"
        )
    if corrector is not None and not isinstance(corrector, AbstractCorrector):
        raise ValueError(
            "corrector must be a probflow corrector object such as LangevinCorrector(snr=0.16, "
            f"steps=1) or AnnealedLangevinCorrector(...), or None, got {corrector!r}"
        )
    predictor.check_sde(sde)
    if corrector is not None:
        corrector.check_sde(sde)
    return sde, eps, steps
