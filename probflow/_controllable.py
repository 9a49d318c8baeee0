"""Controllable generation with one unconditional score model (section 5, appendix I).

- `inpaint`: predictor-corrector sampling where, after every predictor and corrector update, the
  known region is replaced by the known data perturbed to the current noise level,
  x_known(t) = scale(t) x_known + std(t) z (appendix I.2).
- `colorize`: an orthogonal change of colour coordinates whose first axis is the grey direction
  (1, 1, 1)/sqrt(3) decouples grey from colour; in those coordinates colorization is inpainting of
  the first channel (appendix I.3). The SDEs are isotropic, so the score transforms as the data.
- `sample_conditional`: the conditional reverse SDE (eq. 14) with
  score(x, t) + scale * grad_x log p_t(y | x) from a time-dependent classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._failures import NONFINITE, OK, Failure, all_finite, input_failure, raise_if_failed
from ._options import UNSET, SDEOptions, pc_options
from ._pc import (
    AbstractCorrector,
    AbstractPredictor,
    PredictorCorrector,
    ReverseDiffusionPredictor,
    ScoreVectorField,
    _forward_transition,
    solve_pc,
)
from ._results import SampleResult
from ._sde import AbstractSDE
from ._validate import as_float_batch, check_model, check_positive_int, check_shape


class KnownRegionProjection(eqx.Module):
    """Replace the known region by the known data perturbed to time t (appendix I.2)."""

    sde: AbstractSDE
    known: Array  # one example, in model space
    mask: Array  # 1 where known

    def __call__(self, t, x, key):
        scale, std = self.sde.marginal(t)
        noisy = scale * self.known + std * jax.random.normal(key, x.shape, x.dtype)
        return jnp.where(self.mask > 0, noisy.astype(x.dtype), x)


@eqx.filter_jit
def _inpaint(model, sde, x, mask, keys, eps, steps, predictor, corrector, denoise):
    check_model(model, x.shape[1:], x.dtype)
    terms = diffrax.ODETerm(ScoreVectorField(model))

    def one(known, m, key):
        projection = KnownRegionProjection(sde, known, m)
        solver = PredictorCorrector(sde, predictor, corrector, projection)
        k_prior, k_proj, k_chain = jax.random.split(key, 3)
        x_T = sde.prior_sample(k_prior, known.shape, known.dtype)
        x_T = projection(sde.T, x_T, k_proj)
        out, nfe, num_steps, failure = solve_pc(
            terms, solver, x_T, k_chain, steps=steps, eps=eps, denoise=denoise
        )
        # Known values come back exactly.
        return jnp.where(m > 0, known, out), nfe, num_steps, failure

    out, nfe, num_steps, failure = jax.vmap(one)(x, mask, keys)
    return out, nfe, num_steps, input_failure(x, sde.T) | failure


@eqx.filter_jit
def _inpaint_smc(model, sde, x, mask, keys, eps, steps, num_particles, denoise):
    """Sequential Monte Carlo inpainting (Trippe et al. 2022, "SMCDiff").

    One forward trajectory of the known coordinates is drawn from x_known; `num_particles` chains
    of the reverse-diffusion predictor propose the unknown coordinates, each chain is weighted by
    the likelihood of the known trajectory's next value under its own reverse transition, and the
    particles are resampled when the effective sample size falls below half. Because the forward
    noise of the known coordinates is independent of the unknown ones, the target
    p(x_unknown | known path) equals p(x_unknown | x_known): the sampler is exact as the number of
    particles grows (with the exact score and fine steps).
    """
    check_model(model, x.shape[1:], x.dtype)
    dtype = x.dtype
    ts = jnp.linspace(sde.T, eps, steps + 1, dtype=dtype)
    score = jax.vmap(model, in_axes=(None, 0))

    def one(known, m, key):
        k_path, k_prior, k_loop, k_pick = jax.random.split(key, 4)
        # The known coordinates' forward path, from eps up to T (ts reversed).
        scale0, std0 = sde.marginal(ts[-1])
        path_keys = jax.random.split(k_path, steps + 1)
        start = scale0 * known + std0 * jax.random.normal(path_keys[0], known.shape, dtype)

        def forward(xk, i):
            t_lo, t_hi = ts[steps - i], ts[steps - i - 1]
            a, g2 = _forward_transition(sde, t_hi, t_lo)
            nxt = a * xk + jnp.sqrt(g2) * jax.random.normal(path_keys[i + 1], known.shape, dtype)
            return nxt, nxt

        _, ups = jax.lax.scan(forward, start, jnp.arange(steps))
        path = jnp.concatenate([ups[::-1], start[None]], axis=0)  # path[i] at time ts[i]

        parts = sde.prior_sample(k_prior, (num_particles,) + known.shape, dtype)
        parts = jnp.where(m > 0, path[0], parts)
        logw = jnp.zeros((num_particles,), dtype)
        # The time of the first step whose particles became non-finite (NaN: none).
        t_bad = jnp.asarray(jnp.nan, dtype)

        def body(carry, i):
            parts, logw, t_bad = carry
            t, t_next = ts[i], ts[i + 1]
            kz, kr = jax.random.split(jax.random.fold_in(k_loop, i))
            a, g2 = _forward_transition(sde, t, t_next)
            mean = (2.0 - a) * parts + g2 * score(t, parts)  # reverse diffusion (appendix E)
            # Weight: the reverse transition's density of the known path's next value.
            resid = jnp.where(m > 0, path[i + 1] - mean, 0.0)
            axes = tuple(range(1, parts.ndim))
            logw = logw - 0.5 * jnp.sum(resid**2, axis=axes) / g2
            noise = jax.random.normal(kz, parts.shape, dtype)
            parts = jnp.where(m > 0, path[i + 1], mean + jnp.sqrt(g2) * noise)
            # Resample (multinomial) when the effective sample size drops below half.
            w = jax.nn.softmax(logw)
            ess = 1.0 / jnp.sum(w**2)
            idx = jax.random.categorical(kr, logw, shape=(num_particles,))
            do = ess < num_particles / 2
            parts = jnp.where(do, parts[idx], parts)
            logw = jnp.where(do, jnp.zeros_like(logw), logw)
            t_bad = jnp.where(jnp.isnan(t_bad) & ~all_finite(parts), t, t_bad)
            return (parts, logw, t_bad), None

        (parts, logw, t_bad), _ = jax.lax.scan(body, (parts, logw, t_bad), jnp.arange(steps))
        if denoise:
            scale, std = sde.marginal(ts[-1])
            parts = (parts + std**2 * score(ts[-1], parts)) / scale  # Tweedie
            t_bad = jnp.where(jnp.isnan(t_bad) & ~all_finite(parts), ts[-1], t_bad)
        pick = jax.random.categorical(k_pick, logw)
        out = jnp.where(m > 0, known, parts[pick])
        nfe = num_particles * (steps + int(denoise))
        code = jnp.where(jnp.isnan(t_bad), OK, NONFINITE).astype(jnp.int32)
        return (out, jnp.asarray(nfe, jnp.int32), jnp.asarray(steps, jnp.int32),
                Failure(code, t_bad))

    out, nfe, num_steps, failure = jax.vmap(one)(x, mask, keys)
    return out, nfe, num_steps, input_failure(x, sde.T) | failure


def _check_mask(mask, x) -> Array:
    mask = jnp.asarray(mask)
    if mask.ndim == x.ndim - 1 and mask.shape == x.shape[1:]:
        mask = jnp.broadcast_to(mask, x.shape)
    if mask.shape != x.shape:
        raise ValueError(
            f"mask must have the shape of x {tuple(x.shape)} (or of one example "
            f"{tuple(x.shape[1:])}), got {tuple(mask.shape)}"
        )
    values = np.asarray(mask)
    if not np.all((values == 0) | (values == 1)):
        raise ValueError("mask must hold only 0 (unknown) and 1 (known) values")
    return mask.astype(x.dtype)


def inpaint(
    model: Callable,
    sde: AbstractSDE,
    x: ArrayLike,
    mask: ArrayLike,
    *,
    key: PRNGKeyArray,
    predictor: AbstractPredictor | None = None,
    corrector: AbstractCorrector | None = UNSET,
    steps: int | None = None,
    eps: float = 1e-3,
    denoise: bool | None = None,
    num_particles: int = 1,
    options: SDEOptions | None = None,
) -> SampleResult:
    """Fill in x where mask == 0, keeping x where mask == 1 (exactly).

    `num_particles=1` (the paper's method, appendix I.2): PC sampling with the known region
    replaced by x perturbed to the current noise level after every update. Fast, but biased: the
    unknown region is steered by freshly noised known values, so e.g. the mode weights of a
    mixture's conditional come out wrong (measured in docs/controllable.md).
    `num_particles=K > 1`: sequential Monte Carlo (`_inpaint_smc`, Trippe et al. 2022) with the
    reverse-diffusion predictor and no corrector, exact as K grows; costs K times as many
    evaluations (counted in `nfe`).

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `x`: a batch [B, ...] whose known values are kept.
    - `mask`: 1 where x is known, 0 where it is filled in (x's shape, or broadcastable to it).
    - `key`: the PRNG key.
    - `num_particles`: 1 for the paper's method, K > 1 for SMC with K particles.
    - `predictor`, `corrector`, `steps`, `denoise`: the predictor-corrector sampler's settings,
      as in `pf.sample_pc` and `pf.SDEOptions` (which owns their defaults: reverse diffusion,
      `pf.LangevinCorrector(snr=0.16, steps=1)`, 1000 steps, denoised); not given: the default.
    - `eps`: the smallest time (default 1e-3).
    - `options`: a `pf.SDEOptions` plan instead of `predictor`, `corrector`, `steps` and
      `denoise` (both at once: ValueError).

    **Returns:** `SampleResult` with `x`, `nfe` and `num_steps`.
    """
    opts, sde, eps, steps = pc_options(options, sde, eps, predictor=predictor,
                                       corrector=corrector, steps=steps, denoise=denoise)
    predictor, corrector, denoise = opts.predictor, opts.corrector, opts.denoise
    num_particles = check_positive_int(num_particles, "num_particles")
    x = as_float_batch(x, "x")
    mask = _check_mask(mask, x)
    keys = jax.random.split(key, x.shape[0])
    if num_particles > 1:
        if not isinstance(predictor, ReverseDiffusionPredictor) or corrector is not None:
            raise ValueError(
                "num_particles > 1 (SMC inpainting) runs the reverse-diffusion predictor without a "
                "corrector: pass predictor=ReverseDiffusionPredictor(), corrector=None"
            )
        out, nfe, num_steps, failure = _inpaint_smc(
            model, sde, x, mask, keys, eps, steps, num_particles, bool(denoise)
        )
        what = "sequential Monte Carlo inpainting"
    else:
        out, nfe, num_steps, failure = _inpaint(
            model, sde, x, mask, keys, eps, steps, predictor, corrector, bool(denoise)
        )
        what = "predictor-corrector sampling (inpaint)"
    raise_if_failed(failure, what=what, direction=-1)
    return SampleResult(x=out, nfe=nfe, num_steps=num_steps)


def grey_basis(dtype=jnp.float32) -> Array:
    """An orthogonal 3x3 matrix whose first row is the grey direction (1, 1, 1) / sqrt(3)."""
    m = np.array(
        [
            [1 / np.sqrt(3), 1 / np.sqrt(3), 1 / np.sqrt(3)],
            [1 / np.sqrt(2), -1 / np.sqrt(2), 0.0],
            [1 / np.sqrt(6), 1 / np.sqrt(6), -2 / np.sqrt(6)],
        ]
    )
    return jnp.asarray(m, dtype)


class DecoupledColourScore(eqx.Module):
    """The score in decoupled colour coordinates y = x M^T: s_y(y) = s_x(y M) M^T."""

    model: Callable
    basis: Array

    def __call__(self, t, y):
        return self.model(t, y @ self.basis) @ self.basis.T


def colorize(
    model: Callable,
    sde: AbstractSDE,
    gray: ArrayLike,
    *,
    key: PRNGKeyArray,
    predictor: AbstractPredictor | None = None,
    corrector: AbstractCorrector | None = UNSET,
    steps: int | None = None,
    eps: float = 1e-3,
    denoise: bool | None = None,
    num_particles: int = 1,
    options: SDEOptions | None = None,
) -> SampleResult:
    """Colour images [B, H, W, 3] whose channel mean equals `gray` [B, H, W, 1].

    In the coordinates y = x M^T (M orthogonal, first row (1, 1, 1)/sqrt(3)) the first channel is
    sqrt(3) * grey and known; the two colour channels are inpainted; x = y M.

    **Arguments:**

    - `model`: the score model of colour images, `model(t, x) -> score` for one example.
    - `sde`: the SDE.
    - `gray`: grey images [B, H, W, 1].
    - `key`: the PRNG key.
    - `num_particles`: as in `pf.inpaint`.
    - `predictor`, `corrector`, `steps`, `denoise`: the predictor-corrector sampler's settings,
      as in `pf.sample_pc` and `pf.SDEOptions` (which owns their defaults: reverse diffusion,
      `pf.LangevinCorrector(snr=0.16, steps=1)`, 1000 steps, denoised); not given: the default.
    - `eps`: the smallest time (default 1e-3).
    - `options`: a `pf.SDEOptions` plan instead of `predictor`, `corrector`, `steps` and
      `denoise` (both at once: ValueError).

    **Returns:** `SampleResult` with `x`, `nfe` and `num_steps`.
    """
    gray = as_float_batch(gray, "gray")
    if gray.ndim < 2 or gray.shape[-1] != 1:
        raise ValueError(
            f"gray must have a single channel last, shape [B, ..., 1], got {tuple(gray.shape)}"
        )
    basis = grey_basis(gray.dtype)
    y_known = jnp.concatenate(
        [jnp.sqrt(3.0).astype(gray.dtype) * gray, jnp.zeros(gray.shape[:-1] + (2,), gray.dtype)],
        axis=-1,
    )
    mask = jnp.concatenate(
        [jnp.ones_like(gray), jnp.zeros(gray.shape[:-1] + (2,), gray.dtype)], axis=-1
    )
    r = inpaint(
        DecoupledColourScore(model, basis), sde, y_known, mask, key=key, predictor=predictor,
        corrector=corrector, steps=steps, eps=eps, denoise=denoise, num_particles=num_particles,
        options=options,
    )
    return SampleResult(x=r.x @ basis, nfe=r.nfe, num_steps=r.num_steps)


class ClassifierGuidance(eqx.Module):
    """scale * grad_x log p_t(y | x) from classifier logits (eq. 14)."""

    classifier: Callable
    label: Array
    scale: Array

    def __call__(self, t, x, args):
        del args

        def log_posterior(xi):
            return jax.nn.log_softmax(self.classifier(t, xi))[self.label]

        return (self.scale * jax.grad(log_posterior)(x)).astype(x.dtype)


@eqx.filter_jit
def _sample_conditional(model, classifier, sde, labels, scale, keys, shape, dtype, eps, steps,
                        predictor, corrector, denoise):
    check_model(model, shape, dtype)
    score_term = diffrax.ODETerm(ScoreVectorField(model))
    solver = PredictorCorrector(sde, predictor, corrector)

    def one(label, key):
        terms = diffrax.MultiTerm(
            score_term, diffrax.ODETerm(ClassifierGuidance(classifier, label, scale))
        )
        k_prior, k_chain = jax.random.split(key)
        x_T = sde.prior_sample(k_prior, shape, dtype)
        return solve_pc(terms, solver, x_T, k_chain, steps=steps, eps=eps, denoise=denoise)

    return jax.vmap(one)(labels, keys)  # (x, nfe, num_steps, failure)


def sample_conditional(
    model: Callable,
    classifier: Callable,
    sde: AbstractSDE,
    labels: ArrayLike,
    shape: tuple[int, ...],
    *,
    key: PRNGKeyArray,
    scale: float = 1.0,
    predictor: AbstractPredictor | None = None,
    corrector: AbstractCorrector | None = UNSET,
    steps: int | None = None,
    eps: float = 1e-3,
    denoise: bool | None = None,
    dtype=None,
    options: SDEOptions | None = None,
) -> SampleResult:
    """One sample of class `labels[i]` per label: PC sampling of the conditional reverse SDE with
    score + scale * grad_x log p_t(y | x) (eq. 14). `classifier(t, x)` returns logits for one
    example. Each sample costs two evaluations per predictor or corrector step (model and
    classifier gradient); `nfe` counts score-model evaluations.

    **Arguments:**

    - `model`: the score model, `model(t, x) -> score` for one example.
    - `classifier`: `classifier(t, x) -> logits` for one example (noise-conditional).
    - `sde`: the SDE.
    - `labels`: one class per sample, ints [B].
    - `shape`: the shape of one example.
    - `key`: the PRNG key.
    - `scale`: the guidance scale (1: the conditional score of eq. 14).
    - `dtype`: the samples' dtype (default: JAX's default float).
    - `predictor`, `corrector`, `steps`, `denoise`: the predictor-corrector sampler's settings,
      as in `pf.sample_pc` and `pf.SDEOptions` (which owns their defaults: reverse diffusion,
      `pf.LangevinCorrector(snr=0.16, steps=1)`, 1000 steps, denoised); not given: the default.
    - `eps`: the smallest time (default 1e-3).
    - `options`: a `pf.SDEOptions` plan instead of `predictor`, `corrector`, `steps` and
      `denoise` (both at once: ValueError).

    **Returns:** `SampleResult` with `x`, `nfe` and `num_steps`.
    """
    opts, sde, eps, steps = pc_options(options, sde, eps, predictor=predictor,
                                       corrector=corrector, steps=steps, denoise=denoise)
    predictor, corrector, denoise = opts.predictor, opts.corrector, opts.denoise
    shape = check_shape(shape)
    dtype = jnp.result_type(float) if dtype is None else dtype
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    check_positive_int(labels.shape[0], "len(labels)")
    if not callable(classifier):
        raise ValueError("classifier must be a callable classifier(t, x) -> logits")
    try:
        out = eqx.filter_eval_shape(
            classifier, jax.ShapeDtypeStruct((), dtype), jax.ShapeDtypeStruct(shape, dtype)
        )
    except Exception as exc:
        raise ValueError(
            f"classifier(t, x) failed for one example of shape {shape}: {exc}"
        ) from exc
    if len(out.shape) != 1:
        raise ValueError(f"classifier(t, x) must return logits [K], got shape {out.shape}")
    num_classes = out.shape[0]
    bad = (np.asarray(labels) < 0) | (np.asarray(labels) >= num_classes)
    if bad.any():
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (the classifier's classes), got "
            f"{np.asarray(labels)[bad][:5].tolist()}"
        )
    if not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    keys = jax.random.split(key, labels.shape[0])
    x, nfe, num_steps, failure = _sample_conditional(
        model, classifier, sde, labels, jnp.asarray(scale, dtype), keys, shape, dtype, eps,
        steps, predictor, corrector, bool(denoise),
    )
    raise_if_failed(failure, what="predictor-corrector sampling (sample_conditional)",
                    direction=-1)
    return SampleResult(x=x, nfe=nfe, num_steps=num_steps)
