"""Argument checks shared by every public entry point.

Trace-time mistakes (wrong types, shapes, options) raise `ValueError` naming the argument and what
was expected. Runtime values (non-finite data, out-of-range integers) are checked inside the
compiled functions and come back as result codes, raised in Python (`_failures.py`): no host
callback runs inside a compiled solve.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Literal, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._sde import AbstractSDE


def check_sde(sde) -> AbstractSDE:
    if not isinstance(sde, AbstractSDE):
        raise ValueError(
            f"sde must be a probflow SDE (VPSDE, SubVPSDE or VESDE), got {type(sde).__name__}"
        )
    return sde


def check_eps(eps, sde: AbstractSDE, name: str = "eps") -> float:
    if isinstance(eps, (jax.Array, np.ndarray)) and eps.ndim == 0:
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"{name} must be a Python float in (0, T={sde.T}), got {eps!r}")
    eps = float(eps)
    if not (0.0 < eps < sde.T):
        raise ValueError(
            f"{name} must lie in (0, T={sde.T}), got {eps}; the paper uses 1e-3 for sampling "
            "and 1e-5 for likelihoods"
        )
    return eps


@overload
def check_positive_int(value, name: str, *, allow_none: Literal[False] = False) -> int: ...


@overload
def check_positive_int(value, name: str, *, allow_none: bool) -> int | None: ...


def check_positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        ivalue = operator.index(value)  # pyright: ignore[reportArgumentType]  (TypeError below)
    except TypeError:
        expected = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if ivalue < 1:
        raise ValueError(f"{name} must be >= 1, got {ivalue}")
    return ivalue


#: The most bins a quantisation may have: levels past 2**24 are not distinct in float32, where
#: the model sees `(level + u) / num_bins`.
MAX_NUM_BINS = 2**24


def check_num_bins(value, name: str = "num_bins") -> int:
    """An integer number of quantisation bins in [2, 2**24] (a float such as 17.9 is an error,
    never truncated; 0-d integer arrays are taken)."""
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
        value = value.item()
    try:
        if isinstance(value, bool):
            raise TypeError
        bins = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be an integer in [2, 2**24], got {value!r} "
            f"({type(value).__name__})"
        ) from None
    if not 2 <= bins <= MAX_NUM_BINS:
        raise ValueError(
            f"{name} must be an integer in [2, 2**24] (levels past 2**24 are not distinct in "
            f"float32), got {bins}"
        )
    return bins


def check_positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of positive ints, got {shape!r}") from None
    if any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a tuple of positive ints, got {shape!r}")
    return shape


def _key_array(key, name: str) -> tuple[Array, int]:
    """(key as an array, its batch rank): 0 for one key, 1 for one key per example."""
    try:
        arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
    except TypeError:
        arr = None
    if arr is None or not (jnp.issubdtype(arr.dtype, jax.dtypes.prng_key)
                           or (arr.dtype == jnp.uint32 and arr.shape[-1:] == (2,))):
        got = type(key).__name__ if arr is None else f"{arr.dtype} array of shape {arr.shape}"
        raise ValueError(f"{name} must be a PRNG key (jax.random.key), got {got}")
    return arr, arr.ndim - (0 if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key) else 1)


def example_keys(key, n: int, name: str = "key") -> Array:
    """One PRNG key per example of a batch of `n`: `key` split n ways, or `key` itself when it
    already holds one key per example (typed keys of shape [n], or raw uint32 keys [n, 2]).

    Per-example keys make an example's draws depend on its own key only, so any subset of a
    batch can be solved again with the same draws (`pf.evaluate_bits_per_dim`'s solver check).
    """
    arr, batch_ndim = _key_array(key, name)
    if batch_ndim == 0:
        return jax.random.split(arr, n)
    if batch_ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{name} must be one PRNG key or one per example (shape [{n}]), got keys of "
            f"shape {arr.shape[:batch_ndim]}"
        )
    return arr


def holds_example_keys(key, name: str = "key") -> bool:
    """Whether `key` holds keys per example (see `example_keys`), not a single PRNG key."""
    return _key_array(key, name)[1] > 0


def as_float_batch(x, name: str = "x") -> Array:
    """A batch of real examples: a floating array with a leading batch axis."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise ValueError(f"{name} must be an array with a leading batch axis, got {type(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; integer images go to "
            "bits_per_dim, or convert them to the model's data range first"
        )
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a leading batch axis of size >= 1, got shape {x.shape}")
    return x


def check_model(model: Callable, example_shape: tuple[int, ...], dtype, name: str = "model"):
    """The score model must map one example to an array of the same shape."""
    if not callable(model):
        raise ValueError(f"{name} must be a callable model(t, x) -> score, got {type(model)}")
    t = jax.ShapeDtypeStruct((), dtype)
    x = jax.ShapeDtypeStruct(example_shape, dtype)
    try:
        out = eqx.filter_eval_shape(model, t, x)
    except Exception as exc:  # the model cannot take an example of this shape
        raise ValueError(
            f"{name}(t, x) failed for one example of shape {example_shape}: {exc}. Pass data "
            "whose shape (without the batch axis) is what the model expects"
        ) from exc
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(example_shape):
        got = getattr(out, "shape", type(out))
        raise ValueError(
            f"{name}(t, x) must return a score of the example's shape {example_shape}, got {got}; "
            "check that x (without its batch axis) has the shape the model was built for"
        )

