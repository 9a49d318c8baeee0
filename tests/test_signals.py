"""Real signals to real `probflow` processes: Ctrl-C (SIGINT) ends every command with
`interrupted` and exit status 130, also while XLA compiles; SIGTERM makes `probflow train` write
a checkpoint and exit 143, and the resumed run equals an uninterrupted one."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads the signal mask from /proc")

# Every subprocess is bounded by this (a hang fails the test instead of stalling CI); the
# tests never assert on how long anything took.
BOUND_S = 600
ROOT = Path(__file__).resolve().parent.parent

TRAIN = ["train", "--data", "toy:two-moons", "--sde", "vp", "--model", "mlp", "--width", "16",
         "--depth", "1", "--batch-size", "16", "--steps-per-call", "50", "--seed", "3",
         "--no-progress"]
BPD = ["bpd", "--checkpoint", "digits-vp", "--data", "digits", "--limit", "2"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return env


class _Command:
    """`python -m probflow ARGS` in its own session (a signal to its group reaches it as a
    terminal's Ctrl-C would), stdout and stderr to files."""

    def __init__(self, args, tmp_path: Path, name: str):
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "probflow", *args], cwd=tmp_path,
                                         env=_env(), stdout=out, stderr=err,
                                         start_new_session=True)

    def wait_until(self, ready) -> bool:
        """Poll `ready()` until it holds (True) or the process ended (False)."""
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(0.02)
        raise AssertionError("the process did not get ready")

    def handling_signals(self) -> bool:
        """probflow's handlers are installed (SIGTERM is caught: Python itself catches only
        SIGINT); before that, Python is still importing probflow and JAX."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return False
        mask = next(int(line.split()[1], 16) for line in status.splitlines()
                    if line.startswith("SigCgt:"))
        return bool(mask & (1 << (signal.SIGTERM - 1)))

    def signal_group(self, sig) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=BOUND_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, self.out.read_text(), self.err.read_text()


def _interrupted(rc, out, err, command):
    assert rc == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert lines == [f"probflow {command}: interrupted"], err[-3000:]


def test_ctrl_c_while_training_compiles(tmp_path):
    """SIGINT as soon as the run directory exists (the first chunk of steps is compiling):
    `interrupted`, 130, not a swallowed KeyboardInterrupt and a run to the end."""
    cmd = _Command([*TRAIN, "--steps", "100000", "--out", "run"], tmp_path, "train")
    assert cmd.wait_until(lambda: (tmp_path / "run" / "config.json").exists())
    cmd.signal_group(signal.SIGINT)
    rc, out, err = cmd.finish()
    _interrupted(rc, out, err, "train")
    assert out == ""
    assert not (tmp_path / "run" / "writer.lock").exists()  # the lock was given up


def test_ctrl_c_during_bpd(tmp_path):
    """SIGINT to `probflow bpd` once it handles signals (loading, compiling or solving): no
    segmentation fault, `interrupted`, 130."""
    cmd = _Command(BPD, tmp_path, "bpd")
    assert cmd.wait_until(cmd.handling_signals)
    time.sleep(1.0)
    cmd.signal_group(signal.SIGINT)
    _interrupted(*cmd.finish(), "bpd")


def _checkpoint(run: Path):
    import equinox as eqx
    import jax

    import probflow as pf

    model, _, header = pf.load_checkpoint(run / "checkpoint.eqx")
    return header["step"], [np.asarray(x) for x in
                            jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


def _sigterm_then_resume(tmp_path: Path, name: str, steps: int, delay: float | None):
    """SIGTERM `probflow train` `delay` s after it handles signals (None: as soon as it has
    logged its first steps), then resume it to `steps`; the step it stopped at."""
    run = tmp_path / name
    cmd = _Command([*TRAIN, "--steps", str(steps), "--checkpoint-every", "100000", "--out",
                    str(run)], tmp_path, name)
    if delay is None:
        cmd.wait_until(lambda: (run / "log.jsonl").exists())
    else:
        cmd.wait_until(cmd.handling_signals)
        time.sleep(delay)
    cmd.signal_group(signal.SIGTERM)
    rc, out, err = cmd.finish()
    if rc == 0:  # it finished before the signal came
        stopped = steps
    else:
        assert rc == 143, err[-3000:]
        line, = err.strip().splitlines()
        assert line.startswith("probflow train: terminated: stopped at step "), line
        stopped = int(line.split("stopped at step ")[1].split()[0])
        assert (run / "checkpoint.eqx").exists(), line
        assert _checkpoint(run)[0] == stopped
        assert not list(run.glob(".checkpoint.eqx.*.tmp"))
        rc, out, err = _Command([*TRAIN, "--steps", str(steps), "--checkpoint-every", "100000",
                                 "--out", str(run), "--resume"], tmp_path, name + "-resume"
                                ).finish()
        assert rc == 0, err[-3000:]
    steps_logged = [json.loads(line)["step"] for line in (run / "log.jsonl").open()]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps
    return stopped


def _start_reference(tmp_path: Path, steps: int) -> _Command:
    return _Command([*TRAIN, "--steps", str(steps), "--checkpoint-every", "100000", "--out",
                     str(tmp_path / "ref")], tmp_path, "ref")


def _reference(tmp_path: Path, steps: int, started: _Command | None = None):
    """The uninterrupted run's (step, parameters)."""
    rc, _, err = (started or _start_reference(tmp_path, steps)).finish()
    assert rc == 0, err[-3000:]
    return _checkpoint(tmp_path / "ref")


def _same_parameters(run: Path, ref):
    step, leaves = _checkpoint(run)
    assert step == ref[0]
    for a, b in zip(leaves, ref[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """SIGTERM while training: a checkpoint of the step reached, `terminated`, 143; resumed
    to the end, the parameters equal those of an uninterrupted run."""
    steps = 8000
    reference = _start_reference(tmp_path, steps)  # runs meanwhile
    stopped = _sigterm_then_resume(tmp_path, "run", steps, delay=None)
    assert 0 < stopped < steps, "the signal came after the end: make the run longer"
    _same_parameters(tmp_path / "run", _reference(tmp_path, steps, reference))


@pytest.mark.slow
def test_signals_at_random_moments(tmp_path):
    """10 tries each, at random moments once the command handles signals: SIGINT to `probflow
    train` and `probflow bpd` ends them with `interrupted` and 130; SIGTERM'd training runs
    resumed equal an uninterrupted one."""
    rng = random.Random(0)
    for k in range(10):
        cmd = _Command([*TRAIN, "--steps", "20000", "--out", f"int{k}"], tmp_path, f"int{k}")
        assert cmd.wait_until(cmd.handling_signals)
        time.sleep(rng.uniform(0.0, 6.0))
        cmd.signal_group(signal.SIGINT)
        rc, out, err = cmd.finish()
        if rc != 0:  # 0: it finished first
            _interrupted(rc, out, err, "train")
        cmd = _Command(BPD, tmp_path, f"bpd{k}")
        assert cmd.wait_until(cmd.handling_signals)
        time.sleep(rng.uniform(0.0, 10.0))
        cmd.signal_group(signal.SIGINT)
        rc, out, err = cmd.finish()
        if rc != 0:
            _interrupted(rc, out, err, "bpd")
    steps = 20000
    ref = _reference(tmp_path, steps)
    for k in range(10):
        _sigterm_then_resume(tmp_path, f"term{k}", steps, delay=rng.uniform(0.0, 6.0))
        _same_parameters(tmp_path / f"term{k}", ref)
