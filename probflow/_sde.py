"""The forward SDEs of Song et al. (2021), section 3.4.

All three are linear, dx = f(t) x dt + g(t) dw, so each is described by the scalar drift
coefficient f(t), the diffusion g(t) and the exact marginal p_0t(x_t | x_0) = N(scale(t) x_0,
std(t)^2 I). They satisfy g(t)^2 = d[std^2]/dt - 2 f(t) std^2, which the exponential integrators
rely on (checked in the tests).
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Scalar


def _as_time(t: ArrayLike) -> Array:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


class AbstractSDE(eqx.Module):
    """A linear forward SDE dx = f(t) x dt + g(t) dw on [0, T] with Gaussian transitions."""

    @property
    def T(self) -> float:
        """The end time; 1.0 for every SDE of the paper."""
        return 1.0

    @abc.abstractmethod
    def drift_coef(self, t: ArrayLike) -> Scalar:
        """f(t) in f(x, t) = f(t) x."""

    @abc.abstractmethod
    def diffusion(self, t: ArrayLike) -> Scalar:
        """g(t), a scalar."""

    @abc.abstractmethod
    def marginal(self, t: ArrayLike) -> tuple[Scalar, Scalar]:
        """(scale, std) with p_0t(x_t | x_0) = N(scale x_0, std^2 I)."""

    @abc.abstractmethod
    def prior_std(self) -> float:
        """The standard deviation of the prior N(0, prior_std^2 I) at time T."""

    def drift(self, t: ArrayLike, x: ArrayLike) -> Array:
        """f(x, t) = f(t) x (eq. 5)."""
        x = jnp.asarray(x)
        return (self.drift_coef(t) * x).astype(x.dtype)

    def log_snr(self, t: ArrayLike) -> Scalar:
        """lambda(t) = log(scale(t) / std(t)), the half log signal-to-noise ratio."""
        scale, std = self.marginal(t)
        return jnp.log(scale) - jnp.log(std)

    @abc.abstractmethod
    def time_of_log_snr(self, lam: ArrayLike) -> Scalar:
        """The inverse of `log_snr`: the time t with log(scale/std) = lam."""

    def prior_sample(self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=None) -> Array:
        """One draw (of the given shape) from the prior p_T."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        return self.prior_std() * jax.random.normal(key, shape, dtype)

    def prior_logp(self, z: ArrayLike) -> Scalar:
        """log N(z; 0, prior_std^2 I) for one example, a scalar."""
        z = jnp.asarray(z)
        d = z.size
        s = self.prior_std()
        return -0.5 * d * math.log(2 * math.pi * s * s) - 0.5 * jnp.sum(z * z) / (s * s)


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class AbstractLinearBetaSDE(AbstractSDE):
    """The VP family: drift -1/2 beta(t) x with beta(t) = beta_min + t (beta_max - beta_min).

    Both share scale(t) = exp(-B(t) / 2) with B(t) = int_0^t beta (section 3.4); they differ in
    the diffusion and hence in std(t).
    """

    beta_min: eqx.AbstractVar[float]
    beta_max: eqx.AbstractVar[float]

    def __check_init__(self):
        _positive("beta_min", self.beta_min)
        _positive("beta_max", self.beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"beta_max must be >= beta_min, got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}"
            )

    def beta(self, t: ArrayLike) -> Scalar:
        """beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_min + _as_time(t) * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: ArrayLike) -> Scalar:
        """B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2."""
        t = _as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def prior_std(self):
        return 1.0

    def _time_of_integrated_beta(self, b: Array) -> Array:
        """Solve beta_min t + (beta_max - beta_min) t^2 / 2 = b for t >= 0."""
        a = 0.5 * (self.beta_max - self.beta_min)
        if a == 0:
            return b / self.beta_min
        # The root of a t^2 + beta_min t - b = 0 without cancellation.
        return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 4.0 * a * b))


class VPSDE(AbstractLinearBetaSDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (DDPM's limit)."""

    beta_min: float = eqx.field(default=0.1, converter=float)
    beta_max: float = eqx.field(default=20.0, converter=float)

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t))

    def marginal(self, t):
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

    def time_of_log_snr(self, lam):
        # scale^2 / std^2 = exp(-B) / (1 - exp(-B)) = exp(2 lam)  =>  B = log(1 + exp(-2 lam))
        b = jnp.logaddexp(0.0, -2.0 * _as_time(lam))
        return self._time_of_integrated_beta(b)


class SubVPSDE(AbstractLinearBetaSDE):
    """Sub-VP: dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dw."""

    beta_min: float = eqx.field(default=0.1, converter=float)
    beta_max: float = eqx.field(default=20.0, converter=float)

    def diffusion(self, t):
        # 1 - exp(-2B) = s (2 - s) with s = 1 - exp(-B): one expm1, shared with `marginal`.
        # (Two different expm1 in one jitted reduction were miscompiled by jaxlib 0.10.2.)
        s = -jnp.expm1(-self.integrated_beta(t))
        return jnp.sqrt(self.beta(t) * s * (2.0 - s))

    def marginal(self, t):
        b = self.integrated_beta(t)
        return jnp.exp(-0.5 * b), -jnp.expm1(-b)

    def time_of_log_snr(self, lam):
        # scale / std = exp(-B/2) / (1 - exp(-B)) = 1 / (2 sinh(B/2)) = exp(lam), so
        # B = 2 asinh(exp(-lam) / 2): exact in float32 down to B ~ 1e-38 (t near 0).
        b = 2.0 * jnp.arcsinh(0.5 * jnp.exp(-_as_time(lam)))
        return self._time_of_integrated_beta(b)


class VESDE(AbstractSDE):
    """Variance exploding: dx = sqrt(d[sigma^2(t)]/dt) dw, sigma(t) = smin (smax/smin)^t."""

    sigma_min: float = eqx.field(default=0.01, converter=float)
    sigma_max: float = eqx.field(default=50.0, converter=float)

    def __check_init__(self):
        _positive("sigma_min", self.sigma_min)
        _positive("sigma_max", self.sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"sigma_max must be > sigma_min, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )

    def sigma(self, t: ArrayLike) -> Scalar:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_time(t)

    def drift_coef(self, t):
        return jnp.zeros_like(_as_time(t))

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def marginal(self, t):
        # std^2 = sigma(t)^2 - sigma_min^2: exact for the SDE started at time 0.
        t = _as_time(t)
        r = math.log(self.sigma_max / self.sigma_min)
        std = self.sigma_min * jnp.sqrt(jnp.expm1(2.0 * r * t))
        return jnp.ones_like(t), std

    def prior_std(self):
        return self.sigma_max

    def time_of_log_snr(self, lam):
        # std = exp(-lam) = sigma_min sqrt(exp(2 r t) - 1)  =>  t = log1p((e^-lam / smin)^2) / (2 r)
        lam = _as_time(lam)
        r = math.log(self.sigma_max / self.sigma_min)
        return jnp.log1p(jnp.exp(-2.0 * lam) / self.sigma_min**2) / (2.0 * r)
