"""Multi-process runs on JAX's own runtime (jax.distributed, gloo CPU collectives): real
processes on 127.0.0.1 against the single-process run as the reference."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Every subprocess is bounded by this (a hang fails the test instead of stalling CI); the
# tests never assert on how long anything took.
BOUND_S = 600

_WORKER = textwrap.dedent(r"""
    import json, os, signal, sys
    import probflow as pf
    mode, port, out = sys.argv[1], sys.argv[2], sys.argv[5]
    n, i = int(sys.argv[3]), int(sys.argv[4])
    if n > 1:
        pf.initialize_distributed(f"127.0.0.1:{port}", n, i, heartbeat_timeout_seconds=5,
                                  initialization_timeout=120)
    import equinox as eqx, jax, numpy as np
    from probflow.models import MLP

    assert jax.process_count() == n and jax.process_index() == i
    if mode == "die" and i == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # gone without a word, as a crashed host
    sde = pf.VPSDE()
    ds = pf.data.load("toy:two-moons", "train")
    model = MLP(2, sde=sde, width=16, depth=1, key=jax.random.key(0))
    steps = 400 if mode == "die" else 4
    cfg = pf.TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup=2, steps_per_call=2,
                         checkpoint_every=2, seed=1)
    r = pf.train(model, sde, ds, cfg, progress=False, devices=jax.device_count(),
                 out=out + "/run")
    leaves = lambda m: [np.asarray(x).tolist()
                        for x in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))]
    # 5 images in batches of 2: 3 batches, split 2 + 1 over two processes (uneven shares).
    b = pf.distributed_bits_per_dim(r.model, sde, ds.images[:5], key=jax.random.key(3),
                                    batch_size=2, num_bins=ds.num_bins,
                                    data_range=ds.data_range, rtol=1e-3, atol=1e-3)
    # The evaluator's solver check: its 3 tight re-solves are shared between the processes.
    ev = pf.evaluate_bits_per_dim(r.model, sde, ds.images[:5], key=jax.random.key(3),
                                  batch_size=2, check_solver=3, num_bins=ds.num_bins,
                                  data_range=ds.data_range, rtol=1e-3, atol=1e-3)
    with open(f"{out}/result{i}.json", "w") as f:
        json.dump({"params": leaves(r.raw_model), "ema": leaves(r.model), "init": leaves(model),
                   "losses": r.losses.tolist(), "bpd": np.asarray(b.bpd).tolist(),
                   "nfe": np.asarray(b.nfe).tolist(), "logp": np.asarray(b.logp).tolist(),
                   "tight": ev.solver.bpd_tight.tolist(), "paired": ev.solver.bpd.tolist(),
                   "ev_bpd": ev.bpd.tolist()}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return env


def _launch(commands, cwd):
    """Start every command at once; wait (bounded) for all; [(returncode, stderr)].

    Output goes to files, not pipes: a process blocked on a full pipe that nobody reads would
    stall the collectives of the others."""
    logs = [open(cwd / f"proc{k}-{os.getpid()}.log", "w+") for k in range(len(commands))]
    procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                              text=True) for c, f in zip(commands, logs)]
    results = []
    try:
        for p, f in zip(procs, logs):
            p.wait(timeout=BOUND_S)
            f.seek(0)
            results.append((p.returncode, f.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return results


def _worker(tmp_path, mode, n, out, port=0):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    (tmp_path / out).mkdir(exist_ok=True)
    return [[sys.executable, str(script), mode, str(port), str(n), str(i), str(tmp_path / out)]
            for i in range(n)]


def _close(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_two_processes_match_one(tmp_path):
    """(a) Training with a global batch of 16 split over 2 processes gives one process's
    parameters, losses and EMA; (b) bits/dim split over them gives its per-example numbers; only
    process 0 writes the run directory."""
    port = _free_port()
    runs = _launch(_worker(tmp_path, "match", 2, "two", port) + _worker(tmp_path, "match", 1,
                                                                        "one"), tmp_path)
    for rc, err in runs:
        assert rc == 0, err[-3000:]
    one = json.loads((tmp_path / "one" / "result0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"result{i}.json").read_text()) for i in range(2)]
    for res in two:
        _close(res["params"], one["params"], rtol=1e-5, atol=1e-6)
        _close(res["ema"], one["ema"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["losses"], one["losses"], rtol=1e-5)
        assert len(res["bpd"]) == 5
        np.testing.assert_allclose(res["bpd"], one["bpd"], rtol=1e-5)
        np.testing.assert_allclose(res["logp"], one["logp"], rtol=1e-5, atol=1e-5)
        assert res["nfe"] == one["nfe"]
        # The check pairs the evaluation's own values with tight re-solves split over the
        # processes: the same numbers as on one process.
        np.testing.assert_allclose(res["ev_bpd"], one["ev_bpd"], rtol=1e-5)
        np.testing.assert_allclose(res["paired"], one["paired"], rtol=1e-5)
        np.testing.assert_allclose(res["tight"], one["tight"], rtol=1e-5)
        assert len(res["tight"]) == 3 and set(np.round(res["paired"], 5)) <= set(
            np.round(res["ev_bpd"], 5))
    # The training moved the weights (the comparison is not between two initialisations).
    moved = max(np.abs(np.asarray(p) - np.asarray(q)).max()
                for p, q in zip(one["params"], one["init"]))
    assert moved > 1e-3
    # Different examples have different bits/dim (the gather kept them apart, in order).
    assert len(set(np.round(one["bpd"], 4))) == 5
    run = tmp_path / "two" / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]  # written once, by process 0 only
    import probflow as pf

    saved, _, header = pf.load_checkpoint(run / "checkpoint.eqx")
    assert header["step"] == 4
    import equinox as eqx
    import jax

    _close([np.asarray(x) for x in jax.tree.leaves(eqx.filter(saved, eqx.is_inexact_array))],
           one["ema"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_killed_process_fails_the_other(tmp_path):
    """(c) A process killed mid-run makes the survivor exit with an error naming the lost task,
    rather than wait forever in a collective (heartbeat timeout 5 s)."""
    runs = _launch(_worker(tmp_path, "die", 2, "die", _free_port()), tmp_path)
    (rc0, err0), (rc1, _) = runs
    assert rc1 != 0 and rc0 != 0
    assert not (tmp_path / "die" / "result0.json").exists()
    # JAX's coordination service: "The following tasks are unhealthy (stopped sending
    # heartbeats): 1 ... Terminating process because the JAX distributed service detected
    # fatal errors."
    assert "stopped sending heartbeats" in err0, err0[-3000:]


TRAIN = ["-m", "probflow", "train", "--data", "toy:two-moons", "--sde", "vp", "--model", "mlp",
         "--width", "16", "--depth", "1", "--batch-size", "16", "--checkpoint-every", "2",
         "--seed", "1", "--no-progress"]


@pytest.mark.slow
def test_cli_resume_with_one_process_after_two(tmp_path):
    """(d) `probflow train` on 2 processes (--coordinator/--num-processes/--process-id) for 4
    steps, resumed on 1 process to 8, equals an uninterrupted 8-step run on 1 process."""
    port = _free_port()
    two = [[sys.executable, *TRAIN, "--steps", "4", "--out", str(tmp_path / "b"),
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
            "--heartbeat-timeout", "10"] for i in range(2)]
    ref = [[sys.executable, *TRAIN, "--steps", "8", "--out", str(tmp_path / "a")]]
    for rc, err in _launch(two + ref, tmp_path):
        assert rc == 0, err[-3000:]
    rc, err = _launch([[sys.executable, *TRAIN, "--steps", "8", "--out", str(tmp_path / "b"),
                        "--resume"]], tmp_path)[0]
    assert rc == 0, err[-3000:]
    import jax

    import probflow as pf

    ma, _, ha = pf.load_checkpoint(tmp_path / "a" / "checkpoint.eqx")
    mb, _, hb = pf.load_checkpoint(tmp_path / "b" / "checkpoint.eqx")
    assert ha["step"] == hb["step"] == 8
    _close(jax.tree.leaves(ma), jax.tree.leaves(mb), rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").open()]
    assert steps == [2, 4, 6, 8]


# ------------------------------------------------------------------------ failures, bounded
# Every case below ends on every process with a non-zero exit status and one line on stderr
# (the supervisor turns JAX's SIGABRT into it), never a native stack or a hang.


def _probflow(args, cwd, name):
    return {"argv": [sys.executable, "-m", "probflow", *args], "cwd": cwd, "name": name}


def _run_all(specs, tmp_path, *, after_start=None):
    """Start every `_probflow` spec at once; {name: (returncode, stdout, stderr)}. stdout and
    stderr go to files (a full pipe that nobody reads would stall a worker)."""
    env = dict(_env(), PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    procs = {}
    try:
        for s in specs:
            out = open(tmp_path / f"{s['name']}.out", "w")
            err = open(tmp_path / f"{s['name']}.err", "w")
            procs[s["name"]] = (subprocess.Popen(s["argv"], cwd=s["cwd"], env=env, stdout=out,
                                                 stderr=err, start_new_session=True), out, err)
        if after_start is not None:
            after_start({k: p for k, (p, _, _) in procs.items()})
        results = {}
        for name, (p, out, err) in procs.items():
            p.wait(timeout=BOUND_S)
            out.close()
            err.close()
            results[name] = (p.returncode, (tmp_path / f"{name}.out").read_text(),
                             (tmp_path / f"{name}.err").read_text())
        return results
    finally:
        for p, out, err in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
            err.close()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "Check failure" not in err, err[-3000:]
    return lines[0]


def _procs(port, n, i, *, init_timeout=60, heartbeat=100):
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id",
            str(i), "--init-timeout", str(init_timeout), "--heartbeat-timeout", str(heartbeat)]


BPD = ["bpd", "--data", "digits", "--limit", "4", "--batch-size", "2"]


def test_processes_that_disagree_refuse_to_start(tmp_path):
    """Processes given different options (--limit, --checkpoint) or files with different
    contents under the same name refuse to start, all naming the first difference, and print
    no number."""
    specs = []
    port = _free_port()
    for i, limit in enumerate(("16", "12")):
        args = ["bpd", "--data", "digits", "--checkpoint", "digits-vp", "--limit", limit]
        specs.append(_probflow(args + _procs(port, 2, i), tmp_path, f"limit{i}"))
    port = _free_port()
    for i, name in enumerate(("digits-vp", "digits-subvp")):
        specs.append(_probflow([*BPD, "--checkpoint", name] + _procs(port, 2, i), tmp_path,
                               f"model{i}"))
    port = _free_port()
    for i, name in enumerate(("digits-vp", "digits-subvp")):
        here = tmp_path / f"host{i}"  # the same relative path, different files
        here.mkdir()
        (here / "model.eqx").write_bytes(_shipped(name).read_bytes())
        specs.append(_probflow([*BPD, "--checkpoint", "model.eqx"] + _procs(port, 2, i), here,
                               f"file{i}"))
    runs = _run_all(specs, tmp_path)
    expect = {
        "limit": "--limit is 16 in process 0 but 12 in process 1",
        "model": "--checkpoint is 'digits-vp' in process 0 but 'digits-subvp' in process 1",
        "file": "sha256 of --checkpoint model.eqx is '",
    }
    for name, (rc, out, err) in runs.items():
        line = _one_line(err)
        assert rc == 2, (name, err)
        assert out == "", (name, out)  # no number
        assert "refusing to start: the processes disagree about the run" in line
        assert expect[name[:-1]] in line, line


def _shipped(name):
    from probflow._pretrained import pretrained_path

    return pretrained_path(name)


def test_missing_peer_and_busy_port_end_within_the_init_timeout(tmp_path):
    """A process whose peer never comes stops after --init-timeout; process 0 refuses a port
    that is already in use at once, and its peer stops after --init-timeout."""
    import socket as socket_

    busy = socket_.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        specs = [
            _probflow([*BPD, "--checkpoint", "digits-vp"] + _procs(_free_port(), 2, 0,
                                                                   init_timeout=3),
                      tmp_path, "alone0"),
            _probflow([*BPD, "--checkpoint", "digits-vp"] + _procs(_free_port(), 2, 1,
                                                                   init_timeout=3),
                      tmp_path, "alone1"),
            _probflow([*BPD, "--checkpoint", "digits-vp"] + _procs(port, 2, 0, init_timeout=3),
                      tmp_path, "busy0"),
            _probflow([*BPD, "--checkpoint", "digits-vp"] + _procs(port, 2, 1, init_timeout=3),
                      tmp_path, "busy1"),
        ]
        runs = _run_all(specs, tmp_path)
    finally:
        busy.close()
    for name in ("alone0", "alone1", "busy1"):
        rc, out, err = runs[name]
        line = _one_line(err)
        assert rc == 1 and out == ""
        assert "not every process joined the run within --init-timeout 3 s" in line, line
        assert f"process {name[-1]}:" in line
    rc, out, err = runs["busy0"]
    assert rc == 2 and f"port {port} is already in use" in _one_line(err)


def test_duplicate_process_ids(tmp_path):
    """Two processes given the same --process-id: every process stops with one line, and the
    duplicate is named."""
    port0, port1 = _free_port(), _free_port()
    args = [*BPD, "--checkpoint", "digits-vp"]
    specs = [_probflow(args + _procs(port0, 2, 0, init_timeout=5), tmp_path, "zero-a"),
             _probflow(args + _procs(port0, 2, 0, init_timeout=5), tmp_path, "zero-b"),
             _probflow(args + _procs(port1, 2, 0, init_timeout=5), tmp_path, "one-0"),
             _probflow(args + _procs(port1, 2, 1, init_timeout=5), tmp_path, "one-a"),
             _probflow(args + _procs(port1, 2, 1, init_timeout=5), tmp_path, "one-b")]
    runs = _run_all(specs, tmp_path)
    lines = {}
    for name, (rc, out, err) in runs.items():
        lines[name] = _one_line(err)
        assert rc != 0 and out == "", (name, err)
    # Two processes 0: the second finds the port taken (or JAX reports the second
    # registration); the first waits for its missing peer.
    zero = lines["zero-a"] + lines["zero-b"]
    assert "already in use" in zero or "same --process-id" in zero, zero
    one = " ".join(lines[k] for k in ("one-0", "one-a", "one-b"))
    assert "two processes were given --process-id 1" in one or "same --process-id" in one, one


@pytest.mark.slow
def test_peer_killed_mid_run(tmp_path):
    """A process killed mid-run (SIGKILL to it and its supervisor, as a host that dies): a
    lost process 1 makes process 0 stop within its heartbeat timeout, a lost process 0 (the
    coordinator) makes process 1 stop at once; each with one line and exit status 1."""
    import signal
    import time

    train = [a for a in TRAIN[2:] if a != "--no-progress"] + ["--no-progress"]
    specs = []
    for victim in (0, 1):
        port = _free_port()
        for i in range(2):
            specs.append(_probflow([*train, "--steps", "1000000", "--checkpoint-every", "50",
                                    "--out", str(tmp_path / f"run{victim}")]
                                   + _procs(port, 2, i, heartbeat=5), tmp_path, f"v{victim}p{i}"))

    def kill_when_running(procs):
        for victim in (0, 1):
            log = tmp_path / f"run{victim}" / "log.jsonl"
            deadline = time.monotonic() + BOUND_S
            while not log.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            os.killpg(procs[f"v{victim}p{victim}"].pid, signal.SIGKILL)

    runs = _run_all(specs, tmp_path, after_start=kill_when_running)
    rc, out, err = runs["v1p0"]
    line = _one_line(err)
    # JAX's heartbeat or lost coordinator, or gloo's broken connection in the gradient
    # all-reduce, whichever notices first.
    for survivor, lost in (("v1p0", "process 1 stopped responding (no heartbeat for 5 s"),
                           ("v0p1", "lost the connection to process 0")):
        rc, out, err = runs[survivor]
        line = _one_line(err)
        assert rc == 1, line
        assert line.startswith(f"probflow train: error: process {survivor[-1]}: "), line
        assert lost in line or "an operation across the processes failed" in line, line
    assert runs["v0p0"][0] == runs["v1p1"][0] == -signal.SIGKILL


_TERMINATING = ("F1206 00:14:50.154674    9624 client.h:80] Terminating process because the JAX "
                "distributed service detected fatal errors. This most likely indicates that "
                "another task died; see the other task logs for more details. Disable Python "
                "buffering, i.e. `python -u`, to be sure to see all the previous output. "
                "absl::Status: ")
# The fatal lines of JAX 0.10.1's coordination service in real runs on 127.0.0.1 (the
# supervisor reads them from the child's native log).
_FATAL_LOGS = {
    "heartbeat": (_TERMINATING + "UNAVAILABLE: The following tasks are unhealthy (stopped "
                  "sending heartbeats):\n1\nThe tasks have crashed. Check the task logs for an "
                  "earlier error, or scheduler events (e.g. preemption, eviction) to debug "
                  "further.\n\nRPC: /xla.coordination.CoordinationService/PollForError\n"
                  "*** Check failure stack trace: ***\n",
                  "process 1 stopped responding (no heartbeat for 7 s"),
    "same id": ("E1206 00:14:17.729737    8815 coordination_service.cc:517] [1709] 1 "
                "unexpectedly tried to connect with a different incarnation. It has likely "
                "restarted.\n" + _TERMINATING + "ABORTED: 1 unexpectedly tried to connect with a "
                "different incarnation. It has likely restarted.\n",
                "two processes were given --process-id 1"),
    "same id, newer": (_TERMINATING + "ALREADY_EXISTS: Aborted connect attempt as there is a "
                       "request from a newer incarnation.\n\nRPC: /xla.coordination."
                       "CoordinationService/RegisterTask\n",
                       "another process registered with the same --process-id"),
    "missing": (_TERMINATING + "DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination."
                "CoordinationService/RegisterTask\n*** Check failure stack trace: ***\n",
                "not every process joined the run within --init-timeout 9 s"),
    "coordinator": (_TERMINATING + "UNAVAILABLE: Failed to send RPC to coordination service. "
                    "Either the leader task was preempted/died/restarted unexpectedly or this "
                    "task is experiencing network issues.\n:UNKNOWN:Error received from peer  "
                    "{grpc_message:\"recvmsg:Connection reset by peer\", grpc_status:14}\n",
                    "lost the connection to process 0"),
    "other": (_TERMINATING + "INTERNAL: Shutdown barrier has failed.\n",
              "JAX's distributed runtime stopped the process: INTERNAL: Shutdown barrier has "
              "failed."),
    "no log": ("", "the process was ended by SIGSEGV"),
}


@pytest.mark.parametrize("case", list(_FATAL_LOGS))
def test_supervisor_describes_each_fatal_end_in_one_line(case):
    from probflow._cli._supervise import describe_fatal

    log, expected = _FATAL_LOGS[case]
    signum = 11 if case == "no log" else 6
    line = describe_fatal(log, signum, init_timeout=9, heartbeat_timeout=7)
    assert expected in line and "\n" not in line, line


@pytest.mark.slow
def test_sigterm_stops_every_process_at_the_same_step(tmp_path):
    """SIGTERM to both processes of a training run (a preempted job): they agree on the step,
    process 0 writes its checkpoint, both exit 143 with one line; resumed on one process, the
    run equals an uninterrupted one."""
    import signal
    import time

    import jax

    import probflow as pf

    train = [*TRAIN[2:], "--steps-per-call", "10"]
    port = _free_port()
    run = tmp_path / "run"
    specs = [_probflow([*train, "--steps", "100000", "--checkpoint-every", "100000", "--out",
                        str(run)] + _procs(port, 2, i, heartbeat=10), tmp_path, f"p{i}")
             for i in range(2)]

    def terminate_when_running(procs):
        deadline = time.monotonic() + BOUND_S
        while not (run / "log.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in procs.values():
            os.killpg(p.pid, signal.SIGTERM)

    runs = _run_all(specs, tmp_path, after_start=terminate_when_running)
    stopped = set()
    for rc, _, err in runs.values():
        line = _one_line(err)
        assert rc == 143, line
        assert line.startswith("probflow train: terminated: stopped at step "), line
        stopped.add(int(line.split("stopped at step ")[1].split()[0]))
    step, = stopped  # the same on both
    assert 0 < step < 100000
    _, _, header = pf.load_checkpoint(run / "checkpoint.eqx")
    assert header["step"] == step
    end = step + 20
    again = _run_all([_probflow([*train, "--steps", str(end), "--checkpoint-every", "100000",
                                 "--out", str(run), "--resume"], tmp_path, "resume"),
                      _probflow([*train, "--steps", str(end), "--checkpoint-every", "100000",
                                 "--out", str(tmp_path / "ref")], tmp_path, "ref")], tmp_path)
    for rc, _, err in again.values():
        assert rc == 0, err[-3000:]
    ma, _, _ = pf.load_checkpoint(run / "checkpoint.eqx")
    mb, _, _ = pf.load_checkpoint(tmp_path / "ref" / "checkpoint.eqx")
    _close(jax.tree.leaves(ma), jax.tree.leaves(mb), rtol=1e-5, atol=1e-6)


def test_supervisor_names_the_peer_of_a_failed_barrier():
    """The message of the JaxRuntimeError that a barrier raises when a peer misses its
    heartbeats (recorded from `probflow bpd` on 2 processes, process 1 killed)."""
    from probflow._cli._supervise import describe_lost_peer

    message = ("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 "
               "heartbeat timeout. This indicates that the remote task has failed, got "
               "preempted, or crashed unexpectedly. Check the task logs for an earlier error or "
               "scheduler events (e.g. preemption, eviction) to debug further. "
               "[type.googleapis.com/tensorflow.CoordinationServiceError='']. Barrier Id: "
               "probflow/gather/0::0, Task: 1")
    assert describe_lost_peer(message, heartbeat_timeout=100) == (
        "process 1 stopped responding (no heartbeat for 100 s: it died or hung), so the run "
        "was stopped")
    assert describe_lost_peer("UNKNOWN: Gloo all-reduce failed: Connection closed by peer") is None
