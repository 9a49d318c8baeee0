"""The state of a training run and the pure, jitted chunk of optimiser steps that advances it.

`TrainState` holds the raw weights, the optimiser state and the EMA of the weights (the model's
non-array parts stay outside, in `static`). `TrainChunk` is a function of (state, step numbers)
only: step `k` draws its batch, dequantization noise and loss noise from
`fold_in(key(seed), k)`, so chunks of any length compose to the same run (resuming is exact).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ._loss import dsm_loss
from ._sde import AbstractSDE
from ._train_config import TrainConfig
from .data import Dataset
from .data._dataset import to_model_space
from .models._base import AbstractScoreModel

if TYPE_CHECKING:
    import optax

#: How the optimiser is built; recorded in a run's config.json (a resumed run must match).
OPTIMIZER_DESCRIPTION = "clip_by_global_norm, adam, lr * min(1, (k + 1) / max(warmup, 1))"


def learning_rate(config: TrainConfig):
    """Linear warm-up: optimiser step k (counting from 0) uses lr * min(1, (k + 1) / warmup), so
    the first step already moves the weights and step warmup - 1 reaches lr (warmup=0: lr)."""
    lr, warmup = config.lr, max(config.warmup, 1)
    return lambda count: lr * jnp.minimum(1.0, (count + 1.0) / warmup)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    import optax  # imported when training: `import probflow` stays quicker

    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip), optax.adam(learning_rate(config))
    )


def ema_decay(config: TrainConfig, step) -> Array:
    # A warm-up of the EMA decay, so early averages are not dominated by the initialisation.
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


class TrainState(eqx.Module):
    """Raw weights, optimiser state and the EMA of the weights (array leaves of the model)."""

    params: Any
    opt_state: Any
    ema: Any

    @classmethod
    def init(cls, model: AbstractScoreModel, optimizer) -> tuple[TrainState, Any]:
        """The state at step 0 and the model's non-array part (`eqx.combine` joins them)."""
        params, static = eqx.partition(model, eqx.is_inexact_array)
        return cls(params=params, opt_state=optimizer.init(params), ema=params), static

    def as_dict(self) -> dict:
        """The layout saved in checkpoints (and read back by `from_dict`)."""
        return {"params": self.params, "opt_state": self.opt_state, "ema": self.ema}

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(params=d["params"], opt_state=d["opt_state"], ema=d["ema"])


class TrainingData(eqx.Module):
    """The training examples [N, ...] and how a batch reaches model space: integer levels
    dequantized into `data_range` (a `Dataset`), or floats used as they are."""

    examples: Array | np.ndarray
    num_bins: int | None = eqx.field(static=True)
    data_range: tuple[float, float] | None = eqx.field(static=True)
    name: str | None = eqx.field(static=True)

    @classmethod
    def of(cls, data, shape) -> TrainingData:
        """From a `probflow.data.Dataset` or a float array [N, *shape] in model space."""
        if isinstance(data, Dataset):
            arr = data.images
            made = cls(examples=arr, num_bins=data.num_bins, data_range=data.data_range,
                       name=data.name)
        else:
            arr = jnp.asarray(data)
            if not jnp.issubdtype(arr.dtype, jnp.floating):
                raise ValueError(
                    f"data must be a probflow.data.Dataset or a float array [N, ...] in model "
                    f"space, got dtype {arr.dtype}"
                )
            made = cls(examples=arr, num_bins=None, data_range=None, name=None)
        if arr.ndim < 2 or tuple(arr.shape[1:]) != tuple(shape):
            raise ValueError(
                f"data must hold examples of the model's shape {tuple(shape)} (shape [N, "
                f"{', '.join(map(str, shape))}]), got shape {tuple(arr.shape)}"
            )
        if arr.shape[0] < 1:
            raise ValueError("data must hold at least one example")
        return made

    def to_model(self, batch: Array, key: PRNGKeyArray, dequantize: bool) -> Array:
        """A batch in model space: lo + (hi - lo) (levels + u) / num_bins, u ~ U[0, 1)."""
        if self.num_bins is None:
            return batch
        if not dequantize:
            return to_model_space(batch.astype(float), 0.5, self.num_bins, self.data_range)
        u = jax.random.uniform(key, batch.shape)
        return to_model_space(batch.astype(u.dtype), u, self.num_bins, self.data_range)


class TrainChunk(eqx.Module):
    """Optimiser steps [start, start + n) as one jitted call: `chunk(state, steps)` returns the
    new state and the loss of each step. Pure: the same state and steps give the same result.

    `batch_sharding` (data-parallel training, `_distributed`): each step's batch is constrained
    to it, so every device computes the loss on its slice of the global batch.
    """

    static: Any  # the model's non-array part
    sde: AbstractSDE
    data: TrainingData
    base_key: PRNGKeyArray
    optimizer: optax.GradientTransformation = eqx.field(static=True)
    config: TrainConfig = eqx.field(static=True)
    batch_sharding: Any = eqx.field(static=True, default=None)

    def _loss(self, params, x, key):
        c = self.config
        model = eqx.combine(params, self.static)
        return dsm_loss(model, self.sde, x, key=key, weighting=c.weighting, eps=c.eps,
                        importance_sampling=c.importance_sampling)

    def _step(self, state: TrainState, step):
        key = jax.random.fold_in(self.base_key, step)  # per-step keys make resuming exact
        k_idx, k_deq, k_loss = jax.random.split(key, 3)
        examples = self.data.examples
        idx = jax.random.randint(k_idx, (self.config.batch_size,), 0, examples.shape[0])
        batch = examples[idx]
        if self.batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
        x = self.data.to_model(batch, k_deq, self.config.dequantize)
        # A plain function, not the bound method: JAX hashes the functions it transforms, and
        # a bound method would hash this module's (traced) arrays.
        loss_fn = lambda params: self._loss(params, x, k_loss)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        import optax

        params = optax.apply_updates(state.params, updates)
        d = ema_decay(self.config, step)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, params)
        return TrainState(params=params, opt_state=opt_state, ema=ema), loss

    @eqx.filter_jit
    def __call__(self, state: TrainState, steps: Array) -> tuple[TrainState, Array]:
        if steps.shape[0] == 1:
            # No loop: on CPU, XLA runs a conv net's backward pass far slower inside a while
            # loop (lax.scan) than outside one, so conv nets train with steps_per_call=1.
            state, loss = self._step(state, steps[0])
            return state, loss[None]
        return jax.lax.scan(lambda carry, k: self._step(carry, k), state, steps)
