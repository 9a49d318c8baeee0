"""Run directories: one writer at a time (a lock with the owner's pid; a dead owner's lock is
taken over), runs stopped before their first checkpoint restart or resume from step 0, stray
temporary files of killed writers are removed, and a full disk is one line with the previous
checkpoint intact."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import probflow as pf
from probflow._cli import main
from probflow._run_dir import LOCK_NAME, RunDirectory, RunDirectoryError, describe_run
from probflow.models import MLP

SDE = pf.VPSDE()
DATA = 0.5 + 0.3 * jax.random.normal(jax.random.key(0), (256, 2))
BOUND_S = 600
ROOT = Path(__file__).resolve().parent.parent


def tiny_model(seed=0):
    return MLP(2, sde=SDE, width=16, depth=1, key=jax.random.key(seed))


def config(**kw):
    base = dict(steps=40, batch_size=16, lr=3e-3, warmup=5, steps_per_call=10,
                checkpoint_every=20, seed=3)
    base.update(kw)
    return pf.TrainConfig(**base)


def _leaves(m):
    return [np.asarray(x) for x in jax.tree.leaves(m)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _unstarted_run(path: Path, cfg) -> None:
    """What a writer killed before its first checkpoint leaves: config.json, a partial log, a
    temporary checkpoint file and its lock (with its dead pid, no flock held)."""
    run = RunDirectory.create(path, describe_run(tiny_model(), SDE, cfg, None))
    run.close()
    (path / "log.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 2')
    (path / ".checkpoint.eqx.k3j4.tmp").write_bytes(b"half a checkpoint")
    (path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))


def test_run_without_checkpoint_resumes_or_restarts_from_step_0(tmp_path):
    """A run killed before its first checkpoint resumes from step 0 (and equals an
    uninterrupted run) or restarts; the stray temporary file, the dead writer's lock and the
    log lines of the lost steps are gone."""
    cfg = config()
    full = pf.train(tiny_model(), SDE, DATA, cfg, out=tmp_path / "full", progress=False)
    for name, resume in (("resumed", True), ("restarted", False)):
        run = tmp_path / name
        _unstarted_run(run, cfg)
        r = pf.train(tiny_model(), SDE, DATA, cfg, out=run, resume=resume, progress=False)
        assert r.step == 40
        for a, b in zip(_leaves(full.raw_model), _leaves(r.raw_model), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.eqx", "config.json",
                                                         "log.jsonl"]
        steps = [json.loads(line)["step"] for line in (run / "log.jsonl").open()]
        assert steps == [json.loads(line)["step"] for line in (tmp_path / "full" /
                                                               "log.jsonl").open()]


def test_resume_drops_log_lines_after_the_checkpoint_and_stray_files(tmp_path):
    """A killed run logged step 30 after its last checkpoint (step 20): the resumed run logs
    step 30 once, and the killed writer's temporary file is removed."""
    run = tmp_path / "run"
    pf.train(tiny_model(), SDE, DATA, config(steps=20, log_every=10), out=run, progress=False)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 30, "loss": 1.0}\n{"step": 4')  # the last line cut short
    (run / ".checkpoint.eqx.x1y2.tmp").write_bytes(b"")
    pf.train(tiny_model(), SDE, DATA, config(steps=40, log_every=10), out=run, resume=True,
             progress=False)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").open()]
    assert steps == [10, 20, 30, 40]
    assert not list(run.glob(".*.tmp"))


def test_a_live_writers_lock_is_respected_and_a_dead_ones_taken_over(tmp_path):
    run = tmp_path / "run"
    description = describe_run(tiny_model(), SDE, config(), None)
    first = RunDirectory.create(run, description)
    try:
        owner = json.loads((run / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunDirectoryError, match=f"being written by process {os.getpid()}"):
            RunDirectory.resume(run, description)
        with pytest.raises(RunDirectoryError, match="being written by process"):
            pf.train(tiny_model(), SDE, DATA, config(), out=run, resume=True, progress=False)
    finally:
        first.close()
    assert not (run / LOCK_NAME).exists()
    (run / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "h"}))
    r = pf.train(tiny_model(), SDE, DATA, config(), out=run, resume=True, progress=False)
    assert r.step == 40 and not (run / LOCK_NAME).exists()


def test_second_live_writer_gets_one_line(tmp_path, capsys):
    """Two `probflow train` on one run directory: the second stops at once with one line
    naming the first one's pid; the first goes on."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = ["train", "--data", "toy:two-moons", "--sde", "vp", "--model", "mlp", "--width", "16",
            "--depth", "1", "--batch-size", "16", "--no-progress", "--out", str(tmp_path / "run")]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "probflow", *args, "--steps", "1000000"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + BOUND_S
        while not (tmp_path / "run" / "log.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        code = main(args + ["--steps", "1000000", "--resume"])
        err = capsys.readouterr().err
        assert code == 1
        line, = err.strip().splitlines()
        assert f"being written by process {first.pid} on " in line, line
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=BOUND_S)
    assert first.returncode == 130


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                 monkeypatch):
    """ENOSPC while writing the second checkpoint (simulated in fsync, after the data went to
    the temporary file): one line, exit status 1, the first checkpoint unchanged, no
    temporary file left."""
    run = tmp_path / "run"
    saved = {}
    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else ""
        if ".checkpoint.eqx." in name and (run / "checkpoint.eqx").exists():
            saved["before"] = (run / "checkpoint.eqx").read_bytes()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = main(["train", "--data", "toy:two-moons", "--sde", "vp", "--model", "mlp", "--width",
                 "16", "--depth", "1", "--batch-size", "16", "--steps-per-call", "10",
                 "--checkpoint-every", "10", "--steps", "30", "--no-progress", "--out",
                 str(run)])
    err = capsys.readouterr().err
    assert code == 1
    line, = err.strip().splitlines()
    assert line == (f"probflow train: error: cannot write the checkpoint {run / 'checkpoint.eqx'} "
                    "at step 20: No space left on device; the previous checkpoint is unchanged")
    assert (run / "checkpoint.eqx").read_bytes() == saved["before"]
    _, _, header = pf.load_checkpoint(run / "checkpoint.eqx")
    assert header["step"] == 10
    assert not list(run.glob(".*.tmp")) and not (run / LOCK_NAME).exists()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    """On a file system without flock (ENOLCK), a lock naming a live process of this host is
    respected and one naming a dead process is taken over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    description = describe_run(tiny_model(), SDE, config(), None)
    RunDirectory.create(run, description).close()
    host = os.uname().nodename
    (run / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host}))
    with pytest.raises(RunDirectoryError, match=f"being written by process {os.getppid()}"):
        RunDirectory.resume(run, description)
    (run / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": host}))
    r = RunDirectory.resume(run, description)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    r.close()
