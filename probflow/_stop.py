"""A request to stop training at its next safe point.

The command line sets it when a batch scheduler sends SIGTERM (`probflow._cli._signals`); `train`
checks it before its first chunk of steps and after each one, writes a checkpoint and raises
`TrainingStopped`, so that a preempted run resumes where it stopped.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


def request_stop() -> None:
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


def clear_stop() -> None:
    _requested.clear()
