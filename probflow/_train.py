"""Training score models by denoising score matching, resumable and crash-safe."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checkpoint import load_training_state, save_checkpoint
from ._loss import dsm_loss
from ._sde import AbstractSDE
from .data import Dataset
from .models._base import AbstractScoreModel

CHECKPOINT_NAME = "checkpoint.eqx"
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _check_int(name, value, minimum):
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name, value, *, low, low_open=True, high=None):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyperparameters of one training run (the run is a function of these and the model)."""

    steps: int = 20_000  # total optimiser steps
    batch_size: int = 128
    lr: float = 2e-4  # Adam's learning rate after warm-up
    warmup: int = 500  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # global-norm gradient clipping
    ema_decay: float = 0.999  # EMA of the weights (evaluation and saved models use it)
    seed: int = 0
    weighting: str = "default"  # "default" (std^2) or "likelihood" (g^2)
    importance_sampling: bool = False  # t ~ g^2/std^2 (likelihood weighting only)
    eps: float = 1e-5  # t ~ U[eps, T]
    dequantize: bool = True  # uniform dequantization of integer data
    steps_per_call: int = 50  # optimiser steps per jitted call (lax.scan)
    checkpoint_every: int = 1_000
    log_every: int = 100  # steps between JSON-lines log records (and progress-bar updates)

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_float("lr", self.lr, low=0.0)
        _check_int("warmup", self.warmup, 0)
        _check_float("grad_clip", self.grad_clip, low=0.0)
        _check_float("ema_decay", self.ema_decay, low=0.0, low_open=False, high=1.0)
        _check_int("seed", self.seed, 0)
        if self.weighting not in ("default", "likelihood"):
            raise ValueError(f"weighting must be 'default' or 'likelihood', got {self.weighting!r}")
        if self.importance_sampling and self.weighting != "likelihood":
            raise ValueError("importance_sampling=True needs weighting='likelihood'")
        _check_float("eps", self.eps, low=0.0, high=1.0)
        _check_int("steps_per_call", self.steps_per_call, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("log_every", self.log_every, 1)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """`model`: the EMA of the weights (use it); `raw_model`: the last iterate."""

    model: AbstractScoreModel
    raw_model: AbstractScoreModel
    step: int
    losses: np.ndarray  # the loss of each step run in this call


def _optimizer(config: TrainConfig):
    schedule = optax.warmup_constant_schedule(0.0, config.lr, max(config.warmup, 1))
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(schedule))


def _prepare_data(data, shape) -> tuple[jax.Array, Callable]:
    """(array, to_model_space(batch, key)) for a Dataset or a float array in model space."""
    if isinstance(data, Dataset):
        arr = data.images
        lo, hi = data.data_range
        k = data.num_bins

        def to_model(batch, key, dequantize):
            u = jax.random.uniform(key, batch.shape) if dequantize else 0.5
            return lo + (hi - lo) * (batch.astype(u.dtype if dequantize else float) + u) / k

    else:
        arr = jnp.asarray(data)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(
                f"data must be a probflow.data.Dataset or a float array [N, ...] in model "
                f"space, got dtype {arr.dtype}"
            )

        def to_model(batch, key, dequantize):
            return batch

    if arr.ndim < 2 or tuple(arr.shape[1:]) != tuple(shape):
        raise ValueError(
            f"data must hold examples of the model's shape {tuple(shape)} (shape [N, "
            f"{', '.join(map(str, shape))}]), got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] < 1:
        raise ValueError("data must hold at least one example")
    return arr, to_model


def _ema_decay(config: TrainConfig, step):
    # A warm-up of the EMA decay, so early averages are not dominated by the initialisation.
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))


def _make_chunk(
    static, config: TrainConfig, sde, arr, to_model, base_key, optimizer, batch_sharding=None
):
    """A jitted function running optimiser steps [start, start + n) with lax.scan.

    `batch_sharding` (data-parallel training, see `_distributed`): each step's batch is
    constrained to it, so every device computes the loss on its slice of the global batch.
    """

    def loss_fn(params, x, key):
        model = eqx.combine(params, static)
        return dsm_loss(
            model,
            sde,
            x,
            key=key,
            weighting=config.weighting,
            eps=config.eps,
            importance_sampling=config.importance_sampling,
        )

    def one_step(carry, step):
        params, opt_state, ema = carry
        key = jax.random.fold_in(base_key, step)  # per-step keys make resuming exact
        k_idx, k_deq, k_loss = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, arr.shape[0])
        batch = arr[idx]
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        x = to_model(batch, k_deq, config.dequantize)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, k_loss)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        d = _ema_decay(config, step)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return (params, opt_state, ema), loss

    @eqx.filter_jit
    def run(carry, steps):
        if steps.shape[0] == 1:
            # No loop: on CPU, XLA runs a conv net's backward pass far slower inside a while
            # loop (lax.scan) than outside one, so conv nets train with steps_per_call=1.
            carry, loss = one_step(carry, steps[0])
            return carry, loss[None]
        return jax.lax.scan(one_step, carry, steps)

    return run


def _append_log(path: Path | None, record: dict) -> None:
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _run_description(model, sde, config, data_name) -> dict:
    return {
        "model": {"class": type(model).__name__, "hyperparameters": model.hyperparameters},
        "sde": {"class": type(sde).__name__, **{f.name: getattr(sde, f.name) for f in
                                                   dataclasses.fields(sde)}},
        "config": dataclasses.asdict(config),
        "data": data_name,
    }


def train(
    model: AbstractScoreModel,
    sde: AbstractSDE,
    data,
    config: TrainConfig,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    evaluate: Callable[[int, AbstractScoreModel], dict] | None = None,
    data_name: str | None = None,
    devices=None,
) -> TrainResult:
    """Train `model` on `data` by DSM (eq. 7) with Adam, warm-up, clipping and an EMA.

    `data`: a `probflow.data.Dataset` (integers, dequantized each step) or a float array
    [N, ...] in model space. With `out`, a run directory is created (it must not exist or be
    empty) holding `config.json`, `log.jsonl` and `checkpoint.eqx`, the latter rewritten
    atomically every `config.checkpoint_every` steps and at the end; `resume=True` continues
    the run in `out` from its checkpoint up to `config.steps` in total, giving the same result as
    an uninterrupted run. `evaluate(step, ema_model) -> dict` is called at each checkpoint and
    its result logged. Raises `TrainingDivergedError` if the loss becomes NaN.

    `devices`: None trains on JAX's default device; an int N (or a list of devices) trains
    data-parallel on N devices (`probflow._distributed`): parameters replicated, each global
    batch of `config.batch_size` sharded over the devices, the same result as one device up to
    float round-off. In a multi-host run (after `jax.distributed.initialize()`), pass
    `jax.device_count()`; process 0 writes `out`.
    """
    if not isinstance(model, AbstractScoreModel):
        raise ValueError(
            f"model must be a probflow.models score model (MLP, UNet), got {type(model).__name__}"
        )
    if not isinstance(sde, AbstractSDE):
        raise ValueError(f"sde must be a probflow SDE, got {type(sde).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if type(model.sde) is not type(sde) or model.sde != sde:
        raise ValueError(f"sde {sde} differs from the model's own SDE {model.sde}")
    arr, to_model = _prepare_data(data, model.shape)
    mesh = None
    if devices is not None:
        from ._distributed import check_batch_size, make_mesh

        mesh = make_mesh(devices)
        check_batch_size(config.batch_size, mesh)
    writer = jax.process_index() == 0  # in a multi-host run only process 0 writes `out`
    num_bins = data.num_bins if isinstance(data, Dataset) else None
    data_range = data.data_range if isinstance(data, Dataset) else None
    if data_name is None and isinstance(data, Dataset):
        data_name = data.name

    out_dir = None if out is None else Path(out)
    ckpt_path = log_path = None
    if resume and out_dir is None:
        raise ValueError("resume=True needs the run directory `out`")
    description = _run_description(model, sde, config, data_name)
    if out_dir is not None:
        ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME
        if resume:
            if not ckpt_path.exists():
                raise FileNotFoundError(f"cannot resume: no checkpoint in {out_dir}")
            saved = json.loads((out_dir / CONFIG_NAME).read_text())
            mine = json.loads(json.dumps(description))
            saved["config"].pop("steps"), mine["config"].pop("steps")
            if saved != mine:
                diff = [k for k in mine if mine[k] != saved.get(k)]
                raise ValueError(
                    f"cannot resume {out_dir}: its run used a different {', '.join(diff)} "
                    f"(see {out_dir / CONFIG_NAME})"
                )
        elif writer:
            if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
                raise FileExistsError(
                    f"refusing to overwrite the existing run {out_dir}; "
                    f"pass resume=True (--resume) or choose a new output directory"
                )
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n")

    if not writer:
        log_path = None
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = _optimizer(config)
    opt_state = optimizer.init(params)
    ema = params
    step = 0
    if resume:
        like = {"params": params, "opt_state": opt_state, "ema": ema}
        header, state = load_training_state(ckpt_path, like)
        params, opt_state, ema = state["params"], state["opt_state"], state["ema"]
        step = int(header["step"])
        if step > config.steps:
            raise ValueError(
                f"steps must be >= the checkpoint's step {step} to resume, got {config.steps}"
            )
    base_key = jax.random.key(config.seed)
    batch_sharding = None
    if mesh is not None:
        from ._distributed import batch_sharded, put_global, replicated

        params, opt_state, ema = put_global((params, opt_state, ema), replicated(mesh))
        arr = put_global(arr, replicated(mesh))
        batch_sharding = batch_sharded(mesh)
    run = _make_chunk(static, config, sde, arr, to_model, base_key, optimizer, batch_sharding)

    def save(at_step):
        if ckpt_path is None or not writer:
            return
        save_checkpoint(
            ckpt_path,
            eqx.combine(ema, static),
            sde,
            config,
            step=at_step,
            num_bins=num_bins,
            data_range=data_range,
            data=data_name,
            state={"params": params, "opt_state": opt_state, "ema": ema},
        )

    bar = None
    if progress and writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    losses = []
    carry = (params, opt_state, ema)
    last_good = step if resume else None
    t_window, window = time.perf_counter(), []
    try:
        while step < config.steps:
            nxt = min(
                config.steps,
                (step // config.steps_per_call + 1) * config.steps_per_call,
                (step // config.checkpoint_every + 1) * config.checkpoint_every,
            )
            new_carry, chunk_losses = run(carry, jnp.arange(step, nxt))
            chunk_losses = np.asarray(chunk_losses)
            if not np.all(np.isfinite(chunk_losses)):
                bad = step + int(np.argmin(np.isfinite(chunk_losses)))
                where = (
                    f"the last good checkpoint is {ckpt_path} (step {last_good})"
                    if last_good is not None and ckpt_path is not None
                    else "no checkpoint was written"
                )
                _append_log(log_path, {"step": bad, "error": "non-finite loss"})
                raise TrainingDivergedError(
                    f"training stopped: the loss became {chunk_losses[bad - step]} at step {bad}; "
                    f"{where}. Try a smaller learning rate (lr) or stronger gradient clipping."
                )
            carry = new_carry
            params, opt_state, ema = carry
            losses.append(chunk_losses)
            window.append(chunk_losses)
            prev, step = step, nxt
            at_checkpoint = step % config.checkpoint_every == 0 or step == config.steps
            if step // config.log_every == prev // config.log_every and not at_checkpoint:
                continue
            elapsed = time.perf_counter() - t_window
            n_window = sum(len(w) for w in window)
            rate = n_window / elapsed if elapsed > 0 else float("nan")
            record = {"step": step, "loss": float(np.concatenate(window).mean()),
                      "steps_per_s": rate, "time": time.time()}
            t_window, window = time.perf_counter(), []
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{record['loss']:.4g}", steps_per_s=f"{rate:.1f}")
            if at_checkpoint:
                save(step)
                last_good = step
                if evaluate is not None:
                    record["eval"] = evaluate(step, eqx.combine(ema, static))
                    if bar is not None:
                        bar.write(f"step {step}: {record['eval']}")
                    t_window = time.perf_counter()  # evaluation time is not training time
            _append_log(log_path, record)
    finally:
        if bar is not None:
            bar.close()
    all_losses = np.concatenate(losses) if losses else np.zeros((0,), np.float32)
    return TrainResult(
        model=eqx.combine(ema, static),
        raw_model=eqx.combine(params, static),
        step=step,
        losses=all_losses,
    )


