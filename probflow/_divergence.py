"""The likelihood ODE's vector field and the estimators of its divergence (appendix D).

log p_eps(x) = log p_T(x(T)) + int_eps^T div F(x(t), t) dt needs tr(dF/dx) along the path, with
F = f(t) x - 1/2 g(t)^2 s(t, x) (eq. 13). Hutchinson's estimate v^T (dF/dx) v, with a probe v that
has E[v v^T] = I, is unbiased. For a matrix A its variance is 2 ||A_sym||_F^2 with Gaussian probes
and 2 (||A_sym||_F^2 - sum_i A_ii^2) with Rademacher probes, which ignore the diagonal.

The diagonal is what matters here. Near the data the score's Jacobian ds/dx has a large negative
diagonal (about -1/std(t)^2 in the directions in which the data do not vary). Taking the linear
drift out exactly (div F = D f - 1/2 g^2 tr ds/dx, with only tr ds/dx estimated) leaves that
diagonal in the estimate, and for Gaussian probes it is the noisiest choice (2.0 bits/dim per
probe on digits-vp, against 0.8 for the whole drift and 0.14 for Rademacher: docs/benchmarks.md).
So:

- `RademacherTrace` (the default): v^T (dF/dx) v with +-1 probes; the diagonal is exact for free;
- `GaussianTrace`: Hutchinson on the whole drift's Jacobian, as the paper's code does, optionally
  minus a control variate whose trace is exact (`GaussianControlVariate`), which removes most of
  the diagonal (0.37 bits/dim on digits-vp);
- `ExactTrace`: the whole Jacobian diagonal, one push per dimension.

Every estimator returns one estimate per probe, so the likelihood ODE can carry one divergence
integral per probe (delta of shape [P]) from a single linearisation of the model: the spread
between them estimates the probe noise of each example at almost no cost.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from ._sde import AbstractSDE

DIVERGENCE_MODES = ("jvp", "vjp")

#: forms(vectors [n, *shape]) -> (score [*shape], [n] quadratic forms v^T (ds/dx) v). It
#: evaluates the model once; an estimator calls it exactly once per evaluation.
Forms = Callable[[Array], tuple[Array, Array]]


def _sum_per_vector(a: Array) -> Array:
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def score_and_forms(model: Callable, t, x: Array, mode: str) -> Forms:
    """The `forms` of `model(t, .)` at x: one JVP (one vector), one linearisation pushed along
    every vector (jvp mode), or one VJP pulled back along every vector (vjp mode)."""

    def forms(vectors):
        fn = lambda xi: model(t, xi)
        if mode == "vjp":
            score, vjp_fn = jax.vjp(fn, x)
            pushed = jax.vmap(lambda v: vjp_fn(v)[0])(vectors)
        elif vectors.shape[0] == 1:
            score, jv = jax.jvp(fn, (x,), (vectors[0],))
            pushed = jv[None]
        else:
            score, lin = jax.linearize(fn, x)
            pushed = jax.vmap(lin)(vectors)
        return score, _sum_per_vector(vectors * pushed)

    return forms


class AbstractTraceEstimator(eqx.Module):
    """How div F = tr(dF/dx) of the probability-flow drift is computed along one solve.

    `draw` gives the probes of one example, fixed for its whole solve; `divergence` returns the
    score and `num_probes` estimates of div F at (t, x), one per probe, each unbiased.
    """

    num_probes: eqx.AbstractVar[int]

    @abc.abstractmethod
    def draw(self, key: PRNGKeyArray, shape: tuple[int, ...], dtype) -> PyTree:
        """The probes of one example (None if the estimator needs none)."""

    @abc.abstractmethod
    def divergence(
        self, sde: AbstractSDE, t, x: Array, probes: PyTree, forms: Forms
    ) -> tuple[Array, Float[Array, " P"]]:
        """(score at (t, x), [num_probes] estimates of div F(t, x)); calls `forms` once."""


class ExactTrace(AbstractTraceEstimator):
    """The exact divergence: the Jacobian diagonal from one linearisation pushed along every basis
    vector (D pushes per evaluation). One "probe", without noise."""

    num_probes: int = eqx.field(static=True, default=1, init=False)

    def draw(self, key, shape, dtype):
        del key, shape, dtype
        return None

    def divergence(self, sde, t, x, probes, forms):
        del probes
        basis = jnp.eye(x.size, dtype=x.dtype).reshape((x.size,) + x.shape)
        score, diag = forms(basis)
        f = sde.drift_coef(t)
        g2 = sde.diffusion(t) ** 2
        return score, (f * x.size - 0.5 * g2 * jnp.sum(diag))[None]


def _check_num_probes(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_probes must be a positive integer, got {n!r}")


def _whole_drift(sde, t, probes, forms):
    """Hutchinson on the whole drift: v^T (dF/dx) v = f |v|^2 - 1/2 g^2 v^T (ds/dx) v."""
    score, quad = forms(probes)
    f = sde.drift_coef(t)
    g2 = sde.diffusion(t) ** 2
    return score, f * _sum_per_vector(probes * probes) - 0.5 * g2 * quad


class RademacherTrace(AbstractTraceEstimator):
    """Hutchinson's estimate with `num_probes` Rademacher (+-1) probes: the lowest variance of the
    three (it has no diagonal term; |v|^2 = D, so the linear drift part is exact either way)."""

    num_probes: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        _check_num_probes(self.num_probes)

    def draw(self, key, shape, dtype):
        return jax.random.rademacher(key, (self.num_probes,) + tuple(shape), dtype)

    def divergence(self, sde, t, x, probes, forms):
        del x
        return _whole_drift(sde, t, probes, forms)


class GaussianControlVariate(eqx.Module):
    """The score of p_t as it would be if the data were Gaussian with per-dimension `variance`.

    For a linear SDE, data N(mu, diag(variance)) give p_t = N(m(t) mu, m(t)^2 variance + std(t)^2)
    with (m, std) = `sde.marginal(t)`, whose score s_G(t, x) = -(x - m mu) / (m^2 variance + std^2)
    has the diagonal Jacobian c(t) = -1 / (m^2 variance + std^2), constant in x (so the mean never
    matters). `GaussianTrace` estimates only tr(ds/dx - c) by Hutchinson and adds sum(c) exactly.
    `variance` has the example's shape, in model space; `fit` estimates it from data.
    """

    variance: Array

    def __init__(self, variance: ArrayLike):
        v = jnp.asarray(variance)
        if not jnp.issubdtype(v.dtype, jnp.floating):
            v = v.astype(jnp.result_type(float))
        self.variance = v

    def __check_init__(self):
        if self.variance.ndim < 1:
            raise ValueError(
                "variance must be an array of the example's shape (one variance per dimension), "
                f"got shape {self.variance.shape}"
            )
        try:
            v = np.asarray(self.variance)
        except jax.errors.TracerArrayConversionError:  # built inside jit: unchecked
            return
        if not (np.all(np.isfinite(v)) and np.all(v >= 0)):
            raise ValueError("variance must be finite and >= 0 in every dimension")

    @classmethod
    def fit(cls, x: ArrayLike) -> GaussianControlVariate:
        """Per-dimension variances of a batch `x` [N, ...] of (dequantized) model-space data."""
        x = np.asarray(x, np.float64)
        if x.ndim < 2 or x.shape[0] < 2:
            raise ValueError(
                f"x must be a batch of at least 2 examples [N, ...], got shape {x.shape}"
            )
        return cls(jnp.asarray(x.var(axis=0), jnp.result_type(float)))

    def score_jacobian(self, sde: AbstractSDE, t) -> Array:
        """c(t) = -1 / (m(t)^2 variance + std(t)^2), the diagonal of ds_G/dx."""
        m, std = sde.marginal(t)
        return -1.0 / (m * m * self.variance + std * std)


class GaussianTrace(AbstractTraceEstimator):
    """Hutchinson's estimate with `num_probes` standard Gaussian probes.

    Without a control variate: v^T (dF/dx) v on the whole drift (the paper's code). With one,
    div F = D f - 1/2 g^2 [sum c + v^T (ds/dx - diag c) v], only the remainder being random;
    its variance is Rademacher's plus 2 sum_i (ds_i/dx_i - c_i)^2, so it approaches Rademacher's
    as c matches the score's diagonal.
    """

    num_probes: int = eqx.field(static=True, default=1)
    control_variate: GaussianControlVariate | None = None

    def __check_init__(self):
        _check_num_probes(self.num_probes)
        cv = self.control_variate
        if cv is not None and not isinstance(cv, GaussianControlVariate):
            raise ValueError(
                f"control_variate must be a pf.GaussianControlVariate or None, got {type(cv)}"
            )

    def draw(self, key, shape, dtype):
        return jax.random.normal(key, (self.num_probes,) + tuple(shape), dtype)

    def divergence(self, sde, t, x, probes, forms):
        if self.control_variate is None:
            return _whole_drift(sde, t, probes, forms)
        score, quad = forms(probes)
        c = self.control_variate.score_jacobian(sde, t).astype(x.dtype)
        f = sde.drift_coef(t)
        g2 = sde.diffusion(t) ** 2
        # sum c + v^T (J - diag c) v = quad - sum((v^2 - 1) c): no cancellation of large sums.
        rest = quad - _sum_per_vector((probes * probes - 1.0) * c)
        return score, f * x.size - 0.5 * g2 * rest


def make_trace_estimator(trace, num_probes: int, control_variate) -> AbstractTraceEstimator:
    """The estimator for a public function's `trace` ("rademacher", "gaussian", "exact" or an
    estimator object) with `num_probes` and `control_variate`; raises ValueError otherwise."""
    if isinstance(trace, AbstractTraceEstimator):
        if num_probes not in (1, trace.num_probes):
            raise ValueError(
                f"num_probes={num_probes} conflicts with trace={trace!r}; set the number of "
                "probes on the estimator"
            )
        if control_variate is not None:
            raise ValueError(
                "control_variate goes into the estimator when trace is an estimator object: "
                "pf.GaussianTrace(num_probes, control_variate)"
            )
        return trace
    names = ("rademacher", "gaussian", "exact")
    if not isinstance(trace, str) or trace not in names:
        raise ValueError(
            f"trace must be one of {names} or a pf.AbstractTraceEstimator, got {trace!r}"
        )
    if control_variate is not None and trace != "gaussian":
        raise ValueError(
            f"control_variate is for trace='gaussian' only, got trace={trace!r} (Rademacher "
            "probes already compute a diagonal control variate's part exactly)"
        )
    if trace == "exact":
        return ExactTrace()
    if trace == "rademacher":
        return RademacherTrace(num_probes)
    return GaussianTrace(num_probes, control_variate)


class AugmentedProbabilityFlowODE(eqx.Module):
    """The probability-flow ODE with d/dt of int div F (appendix D), from one JVP or VJP.

    State `(x, delta)`. `probes` are `estimator.draw(...)` for this example, fixed for the solve.
    A `delta` of shape [P] integrates one divergence per probe; a scalar `delta` their mean.
    Without an estimator: the exact trace if `probes` is None, otherwise Hutchinson on the whole
    drift's Jacobian with the given probes [P, *shape].
    """

    model: Callable
    sde: AbstractSDE
    probes: PyTree
    divergence_mode: str = eqx.field(static=True)
    estimator: AbstractTraceEstimator

    def __init__(
        self,
        model: Callable,
        sde: AbstractSDE,
        probes: PyTree = None,
        divergence_mode: str = "jvp",
        estimator: AbstractTraceEstimator | None = None,
    ):
        self.model = model
        self.sde = sde
        self.probes = probes
        self.divergence_mode = divergence_mode
        if estimator is None:
            estimator = ExactTrace() if probes is None else RademacherTrace(probes.shape[0])
        self.estimator = estimator

    def __check_init__(self):
        if self.divergence_mode not in DIVERGENCE_MODES:
            raise ValueError(
                f"divergence_mode must be one of {DIVERGENCE_MODES}, got {self.divergence_mode!r}"
            )
        if not isinstance(self.estimator, AbstractTraceEstimator):
            raise ValueError(
                f"estimator must be a pf.AbstractTraceEstimator, got {type(self.estimator)}"
            )

    def __call__(self, t, y, args):
        del args
        x, delta = y
        forms = score_and_forms(self.model, t, x, self.divergence_mode)
        score, div = self.estimator.divergence(self.sde, t, x, self.probes, forms)
        f = self.sde.drift_coef(t)
        g2 = self.sde.diffusion(t) ** 2
        dx = (f * x - 0.5 * g2 * score).astype(x.dtype)  # eq. (13)
        div = div if jnp.ndim(delta) == 1 else jnp.mean(div)
        return dx, div.astype(delta.dtype)
