"""Supervising a multi-process run: JAX's aborts become one line and a non-zero exit status.

JAX's distributed runtime ends a process with SIGABRT and a C++ stack when a peer is missing at
start-up, registers twice, or dies mid-run, and nothing in its Python API stops it. So a command
given the process options runs its work in a child (`python -m probflow` with the same arguments)
and this parent waits for it:

- the child's stdout and its Python-level stderr (messages, progress bars) go straight to the
  parent's; native output (XLA/absl logs, abort stacks) goes to a temporary log file instead
  (`become_worker`: file descriptor 2 points to the log, `sys.stderr` to the real stderr);
- a child that exits normally passes its exit status through (its own message, if any, is on
  stderr already); a child ended by a signal (SIGABRT from JAX, SIGSEGV, SIGKILL) is described
  in one line read from the log (`describe_fatal`), with the log's path, and the status is 1;
- SIGINT and SIGTERM to the parent are passed on to the child; a child that has not ended 10 s
  after a SIGINT is killed (status 130); a child whose parent dies ends itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: The child reads the native log's path from this variable (and removes it).
LOG_ENV = "PROBFLOW_SUPERVISED_LOG"

#: A child still running this long after a forwarded SIGINT is killed.
INTERRUPT_GRACE_S = 10.0


def is_worker() -> bool:
    return LOG_ENV in os.environ


def become_worker() -> None:
    """In the supervised child: native output (fd 2) to the log, Python's stderr to the real
    stderr; end this process if the supervising parent goes away."""
    log = os.environ.pop(LOG_ENV, None)
    if log is None:
        return
    real = os.dup(2)
    native = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(native, 2)
    os.close(native)
    sys.stderr = open(real, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None),
                      errors="backslashreplace")
    parent = os.getppid()

    def watch_parent():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch_parent, name="probflow-parent", daemon=True).start()


def supervise(argv: list[str], args) -> int:
    """Run `probflow ARGV` in a supervised child; its exit status (see the module docstring)."""
    fd, log = tempfile.mkstemp(prefix="probflow-native-", suffix=".log")
    os.close(fd)
    env = dict(os.environ, **{LOG_ENV: log})
    child = subprocess.Popen([sys.executable, "-m", "probflow", *argv], env=env)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            child.send_signal(signum)
        except (ProcessLookupError, OSError):
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupted_at = None
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if signal.SIGINT in received and interrupted_at is None:
                interrupted_at = time.monotonic()
            if interrupted_at is not None and time.monotonic() - interrupted_at > INTERRUPT_GRACE_S:
                child.kill()
                child.wait()
                code = -signal.SIGKILL
                break
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if code >= 0:
        Path(log).unlink(missing_ok=True)
        return code
    if signal.SIGINT in received:
        print(f"probflow {args.command}: interrupted", file=sys.stderr)
        Path(log).unlink(missing_ok=True)
        return 130
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        text = ""
    reason = describe_fatal(text, -code, init_timeout=getattr(args, "init_timeout", None),
                            heartbeat_timeout=getattr(args, "heartbeat_timeout", None))
    where = f"process {args.process_id}" if getattr(args, "process_id", None) is not None \
        else "this process"
    print(f"probflow {args.command}: error: {where}: {reason} (details: {log})", file=sys.stderr)
    return 1


def describe_fatal(log: str, signum: int, *, init_timeout=None, heartbeat_timeout=None) -> str:
    """One line saying why JAX's runtime (or the OS) ended a process, from its native log."""
    lost = describe_lost_peer(log, heartbeat_timeout=heartbeat_timeout)
    if lost is not None:
        return lost
    m = re.search(r"ABORTED: (\d+) unexpectedly tried to connect with a different incarnation",
                  log)
    if m:
        return f"two processes were given --process-id {m.group(1)}; each needs its own id"
    if "newer incarnation" in log:
        return "another process registered with the same --process-id; each needs its own id"
    if "DEADLINE_EXCEEDED" in log and "RegisterTask" in log:
        bound = f"--init-timeout {init_timeout} s" if init_timeout else "the start-up timeout"
        return (f"not every process joined the run within {bound} (start all --num-processes "
                "processes with the same --coordinator and distinct --process-id, and check "
                "that the coordinator's host and port are reachable)")
    if ("leader task was preempted/died" in log or "Failed to send RPC to coordination service"
            in log or "Connection reset by peer" in log):
        return "lost the connection to process 0 (the coordinator stopped: see its output)"
    if "Gloo" in log or "gloo" in log:
        return "a collective operation failed (a peer process stopped: see its output)"
    m = re.search(r"absl::Status: ([^\n]*)", log)
    if m:
        return f"JAX's distributed runtime stopped the process: {m.group(1).strip()}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"the process was ended by {name}"


def describe_lost_peer(text: str, *, heartbeat_timeout=None) -> str | None:
    """'process K stopped responding ...' if `text` (a native log or a `JaxRuntimeError`'s
    message) reports a peer's missed heartbeats, else None."""
    m = re.search(r"stopped sending heartbeats\):\s*\n\s*([\d, ]+)", text) or re.search(
        r"Task (\d+) heartbeat timeout", text)
    if m is None and "stopped sending heartbeats" not in text:
        return None
    who = f"process {m.group(1).strip()}" if m else "a process"
    bound = f" for {heartbeat_timeout} s" if heartbeat_timeout else ""
    return (f"{who} stopped responding (no heartbeat{bound}: it died or hung), so the run "
            "was stopped")
