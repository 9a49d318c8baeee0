"""Training score models by denoising score matching, resumable and crash-safe.

`train` is a loop over parts that each own one idea: `TrainConfig` (`_train_config.py`), the
state and the pure jitted chunk of steps (`_train_state.py`), the run directory
(`_run_dir.py`) and the progress log (`_train_progress.py`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._run_dir import CHECKPOINT_NAME as CHECKPOINT_NAME
from ._run_dir import CONFIG_NAME as CONFIG_NAME
from ._run_dir import LOG_NAME as LOG_NAME
from ._run_dir import RunDirectory, describe_run
from ._sde import AbstractSDE
from ._train_config import TrainConfig as TrainConfig
from ._train_progress import TrainProgress
from ._train_state import TrainChunk, TrainingData, TrainState, make_optimizer
from .models._base import AbstractScoreModel


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingStopped(RuntimeError):
    """Training stopped early on request (`probflow._stop`: SIGTERM to `probflow train`), after
    writing a checkpoint of the step it reached."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """`model`: the EMA of the weights (use it); `raw_model`: the last iterate."""

    model: AbstractScoreModel
    raw_model: AbstractScoreModel
    step: int
    losses: np.ndarray  # the loss of each step run in this call


def _check_arguments(model, sde, config) -> None:
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
    an uninterrupted run (from step 0 if the run was stopped before its first checkpoint).
    `evaluate(step, ema_model) -> dict` is called at each checkpoint and its result logged.
    Raises `TrainingDivergedError` if the loss becomes NaN, `RunDirectoryError` (a
    RuntimeError) if another live process writes `out` (its `writer.lock`) or a write fails
    (the previous checkpoint is kept), and `TrainingStopped` after writing a checkpoint when a
    stop was requested (`probflow._stop`: SIGTERM to `probflow train`).

    `devices`: None trains on JAX's default device; an int N (or a list of devices) trains
    data-parallel on N devices (`probflow._distributed`): parameters replicated, each global
    batch of `config.batch_size` sharded over the devices, the same result as one device up to
    float round-off. In a multi-host run (after `jax.distributed.initialize()`), pass
    `jax.device_count()`; process 0 writes `out`.

    **Arguments:**

    - `model`: the score model to train.
    - `sde`: its SDE.
    - `data`: a `probflow.data.Dataset` or a float array [N, ...] in model space.
    - `config`: a `TrainConfig`.
    - `out`: a run directory to create (None: nothing written).
    - `resume`: continue the run in `out` from its checkpoint.
    - `progress`: print a progress line.
    - `evaluate`: `evaluate(step, ema_model) -> dict`, called and logged at each checkpoint (None:
      none).
    - `data_name`: the data set's name, recorded in the checkpoint.
    - `devices`: None (JAX's default device), an int N or a list of devices (data-parallel).
    """
    _check_arguments(model, sde, config)
    examples = TrainingData.of(data, model.shape)
    _check_finite_data(examples.examples)
    data_name = examples.name if data_name is None else data_name
    if resume and out is None:
        raise ValueError("resume=True needs the run directory `out`")
    mesh = None
    if devices is not None:
        from ._distributed import check_batch_size, make_mesh

        mesh = make_mesh(devices)
        check_batch_size(config.batch_size, mesh)
    writer = jax.process_index() == 0  # in a multi-host run only process 0 writes `out`
    run_dir = None
    if out is not None:
        description = describe_run(model, sde, config, data_name)
        open_run = RunDirectory.resume if resume else RunDirectory.create
        run_dir = open_run(out, description, writer=writer)
    try:
        return _train_loop(model, sde, examples, config, run_dir, resume=resume,
                           progress=progress and writer, evaluate=evaluate, data_name=data_name,
                           mesh=mesh)
    finally:
        if run_dir is not None:
            run_dir.close()


def _train_loop(model, sde, examples, config, run_dir, *, resume, progress, evaluate, data_name,
                mesh) -> TrainResult:
    optimizer = make_optimizer(config)
    state, static = TrainState.init(model, optimizer)
    step = 0
    if resume:
        if run_dir is None:
            raise ValueError("resume=True continues the run in out=: pass the run directory")
        step, state = run_dir.load_state(state)
        if step > config.steps:
            raise ValueError(
                f"steps must be >= the checkpoint's step {step} to resume, got {config.steps}"
            )
    batch_sharding = None
    if mesh is not None:
        from ._distributed import batch_sharded, put_global, replicated

        state, examples = put_global((state, examples), replicated(mesh))
        batch_sharding = batch_sharded(mesh)
    chunk = TrainChunk(static=static, sde=sde, data=examples, base_key=jax.random.key(config.seed),
                       optimizer=optimizer, config=config, batch_sharding=batch_sharding)

    def save(at_step):
        if run_dir is not None:
            run_dir.save(at_step, state, static, sde, config, num_bins=examples.num_bins,
                         data_range=examples.data_range, data_name=data_name)

    log = TrainProgress(config.steps, step, show=progress)
    losses = []
    last_good = step if resume and run_dir.has_checkpoint else None
    try:
        while step < config.steps:
            if _stop_requested():
                if last_good != step:
                    save(step)
                where = (f"the checkpoint {run_dir.checkpoint_path} holds it (resume with "
                         "--resume)" if run_dir is not None else "no run directory was given")
                raise TrainingStopped(f"stopped at step {step} of {config.steps} on request; "
                                      f"{where}")
            nxt = config.next_stop(step)
            new_state, chunk_losses = chunk(state, jnp.arange(step, nxt))
            chunk_losses = np.asarray(chunk_losses)
            if not np.all(np.isfinite(chunk_losses)):
                bad = step + int(np.argmin(np.isfinite(chunk_losses)))
                if run_dir is not None:
                    run_dir.append_log({"step": bad, "error": "non-finite loss"})
                raise _diverged(chunk_losses[bad - step], bad, last_good, run_dir)
            state, prev, step = new_state, step, nxt
            losses.append(chunk_losses)
            log.add(chunk_losses)
            at_checkpoint = config.is_checkpoint(step)
            if step // config.log_every == prev // config.log_every and not at_checkpoint:
                continue
            record = log.record(step)
            if at_checkpoint:
                save(step)
                last_good = step
                if evaluate is not None:
                    record["eval"] = evaluate(step, eqx.combine(state.ema, static))
                    log.write(f"step {step}: {record['eval']}")
                    log.restart_clock()  # evaluation time is not training time
            if run_dir is not None:
                run_dir.append_log(record)
    finally:
        log.close()
    return TrainResult(
        model=eqx.combine(state.ema, static),
        raw_model=eqx.combine(state.params, static),
        step=step,
        losses=np.concatenate(losses) if losses else np.zeros((0,), np.float32),
    )


def _check_finite_data(examples) -> None:
    """Float data must be finite: a NaN in the data makes the loss NaN, which would otherwise be
    reported as a divergence (and blamed on the learning rate)."""
    if not jnp.issubdtype(examples.dtype, jnp.inexact):
        return  # integer levels, range-checked by the Dataset
    finite = np.isfinite(np.asarray(examples).reshape(len(examples), -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"data holds NaN or inf values in {len(bad)} of {len(examples)} examples (first: "
            f"example {bad[0]}); remove or fix them before training"
        )


def _stop_requested() -> bool:
    """A stop was requested (`probflow._stop`), in any process of a multi-process run: they
    agree (one tiny all-gather per chunk), so that all of them stop after the same step."""
    from ._stop import stop_requested

    flag = stop_requested()
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    from ._distributed import wait_for_all

    wait_for_all("chunk")  # process 0 may still be writing a checkpoint
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _diverged(loss, bad: int, last_good: int | None, run_dir) -> TrainingDivergedError:
    where = (
        f"the last good checkpoint is {run_dir.checkpoint_path} (step {last_good})"
        if last_good is not None and run_dir is not None
        else "no checkpoint was written"
    )
    return TrainingDivergedError(
        f"training stopped: the loss became {loss} at step {bad}; {where}. Try a smaller "
        "learning rate (lr) or stronger gradient clipping."
    )
