"""A data set's bits/dim with honest error bars: K probes and R dequantizations of every image.

The paper evaluates its test set 5 times with fresh dequantization noise (Song et al. 2021,
appendix D); `evaluate_bits_per_dim` does that at the library level and summarises the values
with `summarize_bits_per_dim` (mean, standard error, spread between images, dequantization and
probe noise). The keys follow `probflow bpd`: image i in repeat r draws its dequantization noise
and probes from `fold_in(fold_in(key, r), i)`, whatever the batch size and the number of
processes, so the command line and the library give the same numbers.

The statistical error bar says nothing about the solver. `estimate_solver_bias` estimates the
solver's bias of the mean: N images chosen at random are solved twice with the same
dequantization and probes (one key), at the evaluation's tolerances and 100x tighter; the mean
paired difference estimates the bias of every image's value (the tighter solve's own error is
about 100^(4/5) times smaller for a method of order 5(4)), and its standard error is their
spread over sqrt(N). The evaluator's check (`check_solver=N`) pairs the first repeat's own values
of N images with their tight re-solves from the same per-image keys, so it solves N images once
more, not twice. The re-solves need none of the evaluation's values, so in one process they run
beside it, in a second thread (`_beside`): the check's small batch uses about one core, and the
evaluation's solves take the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jaxtyping import ArrayLike, PRNGKeyArray

from ._beside import Beside, run_beside
from ._distributed import distributed_bits_per_dim, image_keys
from ._likelihood import bits_per_dim
from ._options import ODEOptions, as_scheduler, ode_options
from ._program_store import stored_jit
from ._results import BitsPerDimResult, BitsPerDimSummary, summarize_bits_per_dim
from ._sde import AbstractSDE
from ._validate import check_positive_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolverBiasEstimate:
    """The solver's estimated bias of the mean bits/dim (`estimate_solver_bias`): `bias` = mean over
    `num_images` of bpd(tolerances) - bpd(tolerances / 100) with the same draws, `bias_se` its
    standard error, `bpd` and `bpd_tight` [N] the paired values, `nfe` and `nfe_tight` [N]."""

    bias: float
    bias_se: float
    num_images: int
    rtol: float
    atol: float
    bpd: np.ndarray
    bpd_tight: np.ndarray
    nfe: np.ndarray
    nfe_tight: np.ndarray

    def as_dict(self) -> dict:
        return {"bias": self.bias, "bias_se": self.bias_se, "num_images": self.num_images,
                "rtol": self.rtol, "atol": self.atol, "nfe_mean": float(self.nfe.mean()),
                "nfe_tight_mean": float(self.nfe_tight.mean())}


# The solve keywords of `bits_per_dim` that build its plan.
_PLAN_KEYWORDS = ("solver", "rtol", "atol", "steps", "max_steps", "time", "schedule", "slots")


def _plans(sde: AbstractSDE, options: dict) -> tuple[ODEOptions, ODEOptions, dict]:
    """(the plan of `options`, the same plan 100x tighter, the other options)."""
    options = dict(options)
    if not isinstance(options.get("method", "ode"), str) or options.get("method", "ode") != "ode":
        raise ValueError("check_solver applies to method='ode' (the ELBO has no solver)")
    plan_keywords = {k: options.pop(k) for k in _PLAN_KEYWORDS if k in options}
    slots = plan_keywords.pop("slots", "auto")
    plan = ode_options(
        options.pop("options", None), lambda **given: ODEOptions.bits_per_dim(sde, **given),
        scheduler=None if slots == "auto" else as_scheduler(slots), **plan_keywords,
    )
    if not plan.adaptive:
        raise ValueError("check_solver needs an adaptive solve (steps=None)")
    return plan, plan.replace(rtol=plan.rtol / 100, atol=plan.atol / 100), options


@stored_jit
def _choose(key: PRNGKeyArray, n: int, k: int):
    return jax.random.choice(key, n, (k,), replace=False)


def _pick(key: PRNGKeyArray, n: int, num_images: int) -> np.ndarray:
    """`num_images` of n images chosen at random (all of them if fewer), in order (one
    program: eager, `jax.random.choice` runs a dozen)."""
    return np.sort(np.asarray(_choose(key, n, min(num_images, n))))


def _paired(bpd, nfe, tight: BitsPerDimResult, plan: ODEOptions) -> SolverBiasEstimate:
    """The estimate from the values `bpd` (and their `nfe`) at the plan's tolerances and the
    same images' values `tight` 100x tighter, with the same draws."""
    bpd = np.asarray(bpd)
    diff = bpd.astype(np.float64) - np.asarray(tight.bpd, np.float64)
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size >= 2 else float("nan")
    return SolverBiasEstimate(
        bias=float(diff.mean()), bias_se=se, num_images=int(diff.size), rtol=float(plan.rtol),
        atol=float(plan.atol), bpd=bpd, bpd_tight=np.asarray(tight.bpd), nfe=np.asarray(nfe),
        nfe_tight=np.asarray(tight.nfe),
    )


def estimate_solver_bias(
    model: Callable, sde: AbstractSDE, x_int: ArrayLike, *, key: PRNGKeyArray, num_images: int,
    **options,
) -> SolverBiasEstimate:
    """Estimate the solver's bias of the mean bits/dim on `num_images` images of `x_int` chosen
    at random: each is solved with `options` (as `bits_per_dim`) and again 100x tighter with the
    same key (same dequantization and probes); see the module docstring.

    **Arguments:**

    - `model`, `sde`: as for `pf.bits_per_dim`.
    - `x_int`: the integer images `[N, ...]`; `num_images` of them are chosen at random.
    - `key`: a PRNG key (keyword-only): picks the images and draws the dequantization and probes.
    - `num_images`: how many images are re-solved (>= 2 for a standard error).
    - `options`: `pf.bits_per_dim`'s options (the solve plan as `options=` or its keywords,
      dequantization, probes); the tight solve is the same plan at `rtol / 100`, `atol / 100`.
      Adaptive solves only.
    """
    num_images = int(check_positive_int(num_images, "num_images") or 1)
    plan, tight, options = _plans(sde, options)
    x_int = x_int if isinstance(x_int, jax.Array) else np.asarray(x_int)
    k_pick, k_eval = jax.random.split(key)
    sub = x_int[_pick(k_pick, int(x_int.shape[0]), num_images)]
    # The tight solve runs beside the other (`run_beside`): the two share the cores.
    beside = run_beside(lambda: bits_per_dim(model, sde, sub, key=k_eval, options=tight,
                                             **options))
    with _joined_on_error(beside):
        a = bits_per_dim(model, sde, sub, key=k_eval, options=plan, **options)
    return _paired(a.bpd, a.nfe, beside.result(), plan)


@contextlib.contextmanager
def _joined_on_error(beside: Beside | None):
    """On an error, wait for the solve running beside before it leaves (nothing is left
    running behind it; the solve is bounded by its max_steps). Ctrl-C does not wait."""
    try:
        yield
    except Exception:
        if beside is not None:
            beside.join()
        raise


def _tight_solve(
    model: Callable, sde: AbstractSDE, x_int, tight: ODEOptions, options: dict, *,
    key: PRNGKeyArray, image_key: PRNGKeyArray, num_images: int,
) -> tuple[np.ndarray, BitsPerDimResult]:
    """The re-solves of `evaluate_bits_per_dim`'s check: (the indices of `num_images` images
    chosen with `key`, their values with the plan `tight` and the draws the first repeat gave
    them, image i's key being `fold_in(image_key, i)`)."""
    idx = _pick(key, int(x_int.shape[0]), num_images)
    keys = image_keys(image_key, idx.astype(np.int32))
    # In a multi-process run each process re-solves its share of the images (one batch each).
    share = -(-len(idx) // jax.process_count())
    return idx, distributed_bits_per_dim(model, sde, x_int[idx], key=keys, batch_size=share,
                                         options=tight, **options)


@dataclasses.dataclass(frozen=True)
class BitsPerDimEvaluation:
    """`summary`: the data set's bits/dim and its error bars; `results`: one `BitsPerDimResult`
    per repeat over all images, in order (`bpd_probes` [N, K] each); `solver`: the solver check
    (`check_solver=N`) or None."""

    summary: BitsPerDimSummary
    results: tuple[BitsPerDimResult, ...]
    solver: SolverBiasEstimate | None = None

    @property
    def solver_bias(self) -> float | None:
        """The solver's estimated bias of `summary.mean` (bits/dim), or None without a check."""
        return None if self.solver is None else self.solver.bias

    @property
    def solver_bias_se(self) -> float | None:
        """The standard error of `solver_bias`."""
        return None if self.solver is None else self.solver.bias_se

    @property
    def bpd(self) -> np.ndarray:
        """[N] each image's bits/dim, the mean over its repeats and probes."""
        return np.mean([np.asarray(r.bpd, np.float64) for r in self.results], axis=0)

    @property
    def nfe(self) -> np.ndarray:
        """[R, N] score evaluations of every image in every repeat."""
        return np.stack([np.asarray(r.nfe) for r in self.results])


def evaluate_bits_per_dim(
    model: Callable,
    sde: AbstractSDE,
    x_int: ArrayLike,
    *,
    key: PRNGKeyArray,
    num_probes: int = 1,
    repeats: int = 1,
    batch_size: int | None = None,
    check_solver: int | None = None,
    **options,
) -> BitsPerDimEvaluation:
    """Bits/dim of the images `x_int` [N, ...] with `num_probes` Hutchinson probes per image and
    `repeats` fresh dequantizations (each with fresh probes), and what its error bar contains.

    Every repeat runs `bits_per_dim` over all images (in batches of `batch_size`, default all at
    once: its slot scheduler keeps the cost at the mean NFE). In a multi-process run
    (`jax.distributed`) each process solves a contiguous share of the batches and every process
    returns all results (`distributed_bits_per_dim`, one repeat): this is the evaluator `probflow
    bpd` runs, on one process or several. `options` go to `bits_per_dim`
    (`num_bins`, `data_range`, `trace`, solver options). The standard error of
    `summary.mean` holds the spread between images and both noises; with more repeats and probes
    only the noises' share falls (as 1/sqrt(repeats) and 1/sqrt(repeats * num_probes)).

    `check_solver=N` also solves N images chosen at random again, 100x tighter, with the same
    draws (`SolverBiasEstimate`): `ev.solver_bias` estimates the solver's
    bias of the mean beside the statistical `ev.summary.sem`, with its standard error
    `ev.solver_bias_se`. The images are chosen with `fold_in(key, repeats)` (unused by the
    repeats); their tight re-solves use the first repeat's draws, and the differences are taken
    from the first repeat's values, so the check costs N tight solves and no other.

    **Arguments:**

    - `model`: the score model.
    - `sde`: its SDE.
    - `x_int`: integer images [N, ...].
    - `key`: the PRNG key (fresh dequantization noise and probes per repeat).
    - `num_probes`: Hutchinson probes per image.
    - `repeats`: fresh dequantizations of the whole set.
    - `batch_size`: images per call of `bits_per_dim` (None: all at once); the draws do not
      depend on it.
    - `options`: `bits_per_dim`'s options (`num_bins`, `data_range`, `trace`, `options=` or the
      solve keywords).
    - `check_solver`: re-solve this many images at 100x tighter tolerances to estimate the
      solver's bias of the mean (None: no check).
    """
    num_check = check_positive_int(check_solver, "check_solver", allow_none=True)
    repeats = check_positive_int(repeats, "repeats")
    num_probes = check_positive_int(num_probes, "num_probes")
    x_int = np.asarray(x_int) if not isinstance(x_int, jax.Array) else x_int
    if x_int.ndim < 1 or x_int.shape[0] < 1:
        raise ValueError(f"x_int must have a leading batch axis, got shape {x_int.shape}")
    n = int(x_int.shape[0])
    batch_size = n if batch_size is None else check_positive_int(batch_size, "batch_size")
    # The check's plans, validated before the evaluation.
    plans = None if num_check is None else _plans(sde, dict(options, num_probes=num_probes))
    check = None
    if plans is not None and num_check is not None:
        # The check's re-solves need none of the evaluation's values: they run beside it
        # (`run_beside`), and only the pairing waits for both. A multi-process run keeps one
        # thread: its processes must meet in their collectives in the same order.
        _, tight, tight_options = plans
        check = run_beside(functools.partial(
            _tight_solve, model, sde, x_int, tight, tight_options,
            key=jax.random.fold_in(key, repeats), image_key=jax.random.fold_in(key, 0),
            num_images=num_check,
        ), alone=jax.process_count() > 1)
    # Repeat r over all images: image i draws from fold_in(fold_in(key, r), i), the batches
    # split across the processes of a multi-process run (one process: the plain loop).
    with _joined_on_error(check):
        results = [
            distributed_bits_per_dim(model, sde, x_int, key=jax.random.fold_in(key, r),
                                     batch_size=batch_size, num_probes=num_probes, **options)
            for r in range(repeats)
        ]
    solver = None
    if check is not None and plans is not None:
        idx, tight_values = check.result()
        first = results[0]
        solver = _paired(np.asarray(first.bpd)[idx], np.asarray(first.nfe)[idx], tight_values,
                         plans[0])
    return BitsPerDimEvaluation(summary=summarize_bits_per_dim(results), results=tuple(results),
                                solver=solver)

