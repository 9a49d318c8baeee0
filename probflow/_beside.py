"""Work run beside the caller's: a second thread, so that two independent solves share the cores.

XLA runs the programs one thread dispatches one after the other, but the programs of two threads
at once. A solve that uses one core well (a small batch) then fills the core that another solve
leaves idle, and one thread's loading of a program runs while the other's program computes.
`run_beside(fn)` starts `fn()` in a daemon thread and returns a `Beside`, whose `result()` joins
it and returns its value or raises its exception. JAX's contexts (`jax.default_device`,
`jax.enable_x64`, `jax.default_matmul_precision`, a mesh, ...) hold for one thread only, so a
thread whose JAX settings differ from the caller's would trace another program: then `fn` runs
inside `result()`, in the caller's thread, as without this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Beside", "run_beside"]

_T = TypeVar("_T")


def _jax_settings() -> Any:
    """This thread's JAX settings that shape a trace (None where JAX cannot say)."""
    try:
        from jax._src import config

        return config.trace_context()
    except Exception:  # another JAX without this function: never run beside
        return None


class Beside(Generic[_T]):
    """`fn()` started by `run_beside`: `result()` waits for it and returns its value or raises
    its exception; `join()` only waits for a thread that runs it (for a caller that is
    leaving with an error of its own, so that no solve is left running behind it)."""

    def __init__(self, fn: Callable[[], _T], alone: bool):
        self._fn = fn
        self._outcome: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        settings = None if alone else _jax_settings()
        if settings is not None:
            self._thread = threading.Thread(target=self._work, args=(settings,),
                                            name="probflow-beside", daemon=True)
            self._thread.start()

    def _work(self, settings) -> None:
        if _jax_settings() != settings:
            return  # another trace context here: `result` runs fn in the caller's thread
        try:
            self._outcome["value"] = self._fn()
        except BaseException as e:  # raised again in the caller's thread, by `result`
            self._outcome["error"] = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def result(self) -> _T:
        self.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        if "value" in self._outcome:
            return self._outcome["value"]
        return self._fn()


def run_beside(fn: Callable[[], _T], *, alone: bool = False) -> Beside[_T]:
    """Start `fn()` beside the caller (see the module docstring); `alone`: run it in the
    caller's thread, at `result()`."""
    return Beside(fn, alone)
