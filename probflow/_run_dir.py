"""A training run's directory: `config.json`, `log.jsonl`, `checkpoint.eqx` and `writer.lock`.

`RunDirectory.create` makes a new run (refusing to overwrite one that has a checkpoint; a run
killed before its first checkpoint is started afresh); `RunDirectory.resume` opens an existing
run after checking that it was started with the same model, SDE, data and hyperparameters
(`steps` may differ), from its checkpoint or, if it has none yet, from step 0; `append_log` adds
one JSON line; `save` rewrites the checkpoint atomically. In a multi-host run only the writer
(process 0) touches the files.

One writer at a time: the writer holds `writer.lock` (its pid and host, and an exclusive `flock`
on it) from opening the run until `close`. A lock whose owner is dead is taken over; a live
owner makes a second writer fail with `RunDirectoryError`. After taking the lock, the writer
removes the temporary files (`.checkpoint.eqx.*.tmp`) that a killed writer left, and the log
lines after the step it resumes from. A failed write (a full disk) is a `RunDirectoryError` and
leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
from pathlib import Path

import equinox as eqx

from ._checkpoint import load_training_state, save_checkpoint, serialise_sde
from ._train_state import OPTIMIZER_DESCRIPTION, TrainState

CHECKPOINT_NAME = "checkpoint.eqx"
LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"
LOCK_NAME = "writer.lock"


class RunDirectoryError(RuntimeError):
    """A run directory cannot be written: another live process writes it, or a write failed
    (then the previous checkpoint is kept)."""


def describe_run(model, sde, config, data_name) -> dict:
    """What `config.json` records; a resumed run must match it in everything but `steps`."""
    return {
        "model": {"class": type(model).__name__, "hyperparameters": model.hyperparameters},
        "sde": serialise_sde(sde),
        "config": dataclasses.asdict(config),
        "optimizer": OPTIMIZER_DESCRIPTION,
        "data": data_name,
    }


@dataclasses.dataclass
class RunDirectory:
    path: Path
    writer: bool = True  # False: another process writes (multi-host); every write is skipped
    has_checkpoint: bool = False  # resume: False for a run stopped before its first checkpoint
    _lock: _WriterLock | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    @classmethod
    def create(cls, path: str | os.PathLike, description: dict, *, writer: bool = True):
        """A new run in `path`, which must not exist, be empty, or hold a run that was stopped
        before its first checkpoint (which is then started afresh)."""
        run = cls(Path(path), writer)
        if not writer:
            return run
        p = run.path
        if p.exists() and not p.is_dir():
            raise FileExistsError(f"refusing to overwrite {p}: it is not a directory")
        p.mkdir(parents=True, exist_ok=True)
        run._lock = _WriterLock.acquire(p)
        try:
            run._remove_stray_files()
            others = [q for q in p.iterdir() if q.name != LOCK_NAME]
            if others and not run._is_unstarted_run():
                raise FileExistsError(
                    f"refusing to overwrite the existing run {p}; "
                    f"pass resume=True (--resume) or choose a new output directory"
                )
            run.log_path.unlink(missing_ok=True)
            run._write(p / CONFIG_NAME, json.dumps(description, indent=2) + "\n", "the config")
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def resume(cls, path: str | os.PathLike, description: dict, *, writer: bool = True):
        """The existing run in `path`, checked to have been started with `description`; from
        its checkpoint, or from step 0 if it was stopped before writing one."""
        run = cls(Path(path), writer)
        config_path = run.path / CONFIG_NAME
        if not run.checkpoint_path.exists() and not config_path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint in {run.path}")
        if writer:
            run._lock = _WriterLock.acquire(run.path)
        try:
            if writer:
                run._remove_stray_files()
            run.has_checkpoint = run.checkpoint_path.exists()
            try:
                saved = json.loads(config_path.read_text())
            except (OSError, ValueError) as e:
                raise FileNotFoundError(f"cannot resume {run.path}: cannot read {config_path} "
                                        f"({e})") from None
            mine = json.loads(json.dumps(description))
            saved.get("config", {}).pop("steps", None)
            mine["config"].pop("steps")
            if saved != mine:
                diff = [k for k in mine if mine[k] != saved.get(k)]
                raise ValueError(
                    f"cannot resume {run.path}: its run used a different {', '.join(diff)} "
                    f"(see {config_path})"
                )
        except BaseException:
            run.close()
            raise
        return run

    def close(self) -> None:
        """Give up the writer's lock (a dead writer's lock is taken over, so a process killed
        before it gets here leaves nothing to clean up by hand)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def load_state(self, like: TrainState) -> tuple[int, TrainState]:
        """(step, state) of the checkpoint, deserialised into the structure of `like`; (0,
        `like`) for a run with no checkpoint yet. The log keeps only the lines up to `step`."""
        if not self.has_checkpoint:
            self.trim_log(0)
            return 0, like
        header, state = load_training_state(self.checkpoint_path, like.as_dict())
        step = int(header["step"])
        self.trim_log(step)
        return step, TrainState.from_dict(state)

    def trim_log(self, step: int) -> None:
        """Drop the log lines of steps after `step` (written after the last checkpoint by a run
        that was then killed: the resumed run writes them again)."""
        if not self.writer or not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                at = json.loads(line).get("step", 0)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(at, int) and at <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            self._write(self.log_path, "".join(keep), "the log")

    def append_log(self, record: dict) -> None:
        if not self.writer:
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as e:
            raise RunDirectoryError(
                f"cannot append to the log {self.log_path}: {e.strerror or e}"
            ) from None

    def save(self, step: int, state: TrainState, static, sde, config, *, num_bins, data_range,
             data_name) -> None:
        """Rewrite the checkpoint atomically: the EMA model, and the state to resume from."""
        if not self.writer:
            return
        try:
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
        except OSError as e:
            kept = ("the previous checkpoint is unchanged" if self.checkpoint_path.exists()
                    else "no checkpoint was written")
            raise RunDirectoryError(
                f"cannot write the checkpoint {self.checkpoint_path} at step {step}: "
                f"{e.strerror or e}; {kept}"
            ) from None
        self.has_checkpoint = True

    # ------------------------------------------------------------------------ internals

    def _is_unstarted_run(self) -> bool:
        """A run stopped before its first checkpoint: a config, maybe a log, nothing else."""
        names = {q.name for q in self.path.iterdir()}
        return CONFIG_NAME in names and names <= {CONFIG_NAME, LOG_NAME, LOCK_NAME}

    def _remove_stray_files(self) -> None:
        """The temporary files of writers killed while writing (`_checkpoint.write_atomically`
        names them `.NAME.XXXX.tmp`); only the lock's holder calls this."""
        for q in self.path.glob(f".{CHECKPOINT_NAME}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                q.unlink()

    def _write(self, path: Path, text: str, what: str) -> None:
        from ._checkpoint import write_atomically

        try:
            write_atomically(path, text.encode())
        except OSError as e:
            raise RunDirectoryError(f"cannot write {what} {path}: {e.strerror or e}") from None


@dataclasses.dataclass(eq=False)
class _WriterLock:
    """`writer.lock` in a run directory: the owner's pid and host, and an exclusive flock on
    the open file while the owner lives (the kernel drops it when the process dies)."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, directory: Path) -> _WriterLock:
        import fcntl

        path = directory / LOCK_NAME
        for _ in range(10):  # retried only if the owner released the file meanwhile
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirectoryError(f"cannot create the lock {path}: {e.strerror or e}"
                                        ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                busy = e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
                if busy or _owner_alive(_read_owner(path)):  # no flock here: the pid decides
                    os.close(fd)
                    owner = _read_owner(path)
                    raise RunDirectoryError(
                        f"the run {directory} is being written by process "
                        f"{owner.get('pid', '?')} on {owner.get('host', '?')} (lock {path}); "
                        "wait for it to end or stop it"
                    ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed it between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            lock = cls(path, fd)
            _HELD.add(lock)
            return lock
        raise RunDirectoryError(f"cannot lock {path}: it keeps being replaced")

    def release(self) -> None:
        _HELD.discard(self)
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


_HELD: set[_WriterLock] = set()


def release_held_locks() -> None:
    """Give up every lock this process holds (before `os._exit` on a signal: the next writer
    would take a dead process's lock over anyway, but need not)."""
    for lock in list(_HELD):
        lock.release()


def _owner_alive(owner: dict) -> bool:
    """Whether the lock's owner runs (on a file system without flock): a process of another
    host cannot be checked and counts as alive (delete the lock by hand if it is gone)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}
