"""How a `probflow` command stops on a signal.

SIGINT (Ctrl-C) ends every command within about a second with `probflow CMD: interrupted` on
stderr and exit status 130, whatever the main thread is doing. Python raises KeyboardInterrupt only
between bytecodes of the main thread: while XLA compiles it can be raised inside one of XLA's
Python callbacks, which swallows it, and the interpreter's teardown while XLA's threads still run
has crashed (SIGSEGV). So the signal only wakes a watcher thread (`signal.set_wakeup_fd`), which
prints the line and ends the process with `os._exit`, skipping the teardown. A training run loses
at most the steps since its last checkpoint (checkpoints are replaced atomically).

SIGTERM (what a batch scheduler sends before it preempts a job) ends a command the same way with
`terminated` and 143, unless the command asked to stop at a safe point instead
(`stop_at_safe_point`, as `probflow train` does): then the watcher requests a stop
(`probflow._stop`), and the training loop writes a checkpoint and leaves after its current chunk
of steps. A repeated SIGTERM changes nothing (a scheduler signals every process of a job, so a
supervised worker gets it both directly and from its supervisor); a SIGINT still ends it at once.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from .. import _run_dir, _stop

_SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def exit_now(message: str, code: int) -> None:
    """Print `message` as one line on stderr and end the process with `code` at once (no
    interpreter teardown, no atexit handlers)."""
    _run_dir.release_held_locks()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not stop the exit
            pass
    try:
        lead = "\n" if sys.stderr.isatty() else ""  # after a progress bar's partial line
        sys.stderr.write(f"{lead}{message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    os._exit(code)


class _Watcher:
    """The signal handlers of one command: a no-op at Python level, plus a thread woken through
    the wakeup fd that does the work."""

    def __init__(self, command: str):
        self.command = command
        self.stop_at_safe_point = False
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._old_handlers = {s: signal.signal(s, _ignore) for s in _SIGNALS}
        self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="probflow-signals",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if not data:
                return
            for number in data:
                self._handle(number)

    def _handle(self, number: int) -> None:
        if number not in _SIGNALS:
            return
        if number == signal.SIGTERM and self.stop_at_safe_point:
            _stop.request_stop()  # again on a repeated SIGTERM: it may come twice (see above)
            return
        word, code = _SIGNALS[signal.Signals(number)]
        exit_now(f"probflow {self.command}: {word}", code)

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        self._write.close()  # the thread's recv returns b"" and it ends
        self._thread.join(timeout=5)
        self._read.close()


def _ignore(signum, frame) -> None:
    """Python-level handler: nothing (the watcher thread acts; see the module docstring)."""


_current: _Watcher | None = None


def install(command: str) -> bool:
    """Install the handlers for `command` (main thread only; False elsewhere, e.g. when `main`
    is called from a worker thread, which then keeps Python's defaults)."""
    global _current
    if threading.current_thread() is not threading.main_thread() or _current is not None:
        return False
    _stop.clear_stop()
    _current = _Watcher(command)
    return True


def uninstall() -> None:
    """Restore the handlers that were there before `install` (for `main` called in-process)."""
    global _current
    if _current is not None:
        _current.close()
        _current = None
    _stop.clear_stop()


def reinstall() -> None:
    """Take the signals back after something replaced their handlers: JAX's distributed
    runtime installs its own SIGTERM handler (its preemption notifier) in
    `jax.distributed.initialize`, which would swallow the signal."""
    if _current is not None and threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, _ignore)


def stop_at_safe_point() -> None:
    """SIGTERM asks the running command to stop at its next safe point (`probflow._stop`)
    instead of ending it at once."""
    if _current is not None:
        _current.stop_at_safe_point = True
