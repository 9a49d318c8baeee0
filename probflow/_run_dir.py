"""A training run's directory: `config.json`, `log.jsonl` and `checkpoint.eqx`.

`RunDirectory.create` makes a new run (refusing to overwrite one); `RunDirectory.resume` opens an
existing run after checking that it was started with the same model, SDE, data and
hyperparameters (`steps` may differ); `append_log` adds one JSON line; `save` rewrites the
checkpoint atomically. In a multi-host run only the writer (process 0) touches the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import equinox as eqx

from ._checkpoint import load_training_state, save_checkpoint, serialise_sde
from ._train_state import OPTIMIZER_DESCRIPTION, TrainState

CHECKPOINT_NAME = "checkpoint.eqx"
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"


def describe_run(model, sde, config, data_name) -> dict:
    """What `config.json` records; a resumed run must match it in everything but `steps`."""
    return {
        "model": {"class": type(model).__name__, "hyperparameters": model.hyperparameters},
        "sde": serialise_sde(sde),
        "config": dataclasses.asdict(config),
        "optimizer": OPTIMIZER_DESCRIPTION,
        "data": data_name,
    }


@dataclasses.dataclass(frozen=True)
class RunDirectory:
    path: Path
    writer: bool = True  # False: another process writes (multi-host); every write is skipped

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    @classmethod
    def create(cls, path: str | os.PathLike, description: dict, *, writer: bool = True):
        """A new run in `path`, which must not exist or be an empty directory."""
        run = cls(Path(path), writer)
        if writer:
            p = run.path
            if p.exists() and (not p.is_dir() or any(p.iterdir())):
                raise FileExistsError(
                    f"refusing to overwrite the existing run {p}; "
                    f"pass resume=True (--resume) or choose a new output directory"
                )
            p.mkdir(parents=True, exist_ok=True)
            (p / CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n")
        return run

    @classmethod
    def resume(cls, path: str | os.PathLike, description: dict, *, writer: bool = True):
        """The existing run in `path`, checked to have been started with `description`."""
        run = cls(Path(path), writer)
        if not run.checkpoint_path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint in {run.path}")
        saved = json.loads((run.path / CONFIG_NAME).read_text())
        mine = json.loads(json.dumps(description))
        saved.get("config", {}).pop("steps", None), mine["config"].pop("steps")
        if saved != mine:
            diff = [k for k in mine if mine[k] != saved.get(k)]
            raise ValueError(
                f"cannot resume {run.path}: its run used a different {', '.join(diff)} "
                f"(see {run.path / CONFIG_NAME})"
            )
        return run

    def load_state(self, like: TrainState) -> tuple[int, TrainState]:
        """(step, state) of the checkpoint, deserialised into the structure of `like`."""
        header, state = load_training_state(self.checkpoint_path, like.as_dict())
        return int(header["step"]), TrainState.from_dict(state)

    def append_log(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def save(self, step: int, state: TrainState, static, sde, config, *, num_bins, data_range,
             data_name) -> None:
        """Rewrite the checkpoint atomically: the EMA model, and the state to resume from."""
        if not self.writer:
            return
        save_checkpoint(
            self.checkpoint_path,
            eqx.combine(state.ema, static),
            sde,
            config,
            step=step,
            num_bins=num_bins,
            data_range=data_range,
            data=data_name,
            state=state.as_dict(),
        )
