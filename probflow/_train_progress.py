"""Progress of a training run: the loss window between log records and the progress bar."""

from __future__ import annotations

import time

import numpy as np


class TrainProgress:
    """Collects each chunk's losses; `record(step)` turns those since the last record into a
    log record (mean loss, steps per second of training time) and updates the bar."""

    def __init__(self, total: int, initial: int, *, show: bool):
        self._bar = None
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                             dynamic_ncols=True)
        self._window: list[np.ndarray] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start timing training afresh (e.g. after an evaluation, which is not training)."""
        self._t = time.perf_counter()

    def add(self, losses: np.ndarray) -> None:
        self._window.append(losses)

    def record(self, step: int) -> dict:
        elapsed = time.perf_counter() - self._t
        n = sum(len(w) for w in self._window)
        rate = n / elapsed if elapsed > 0 else float("nan")
        record = {"step": step, "loss": float(np.concatenate(self._window).mean()),
                  "steps_per_s": rate, "time": time.time()}
        self._window = []
        self.restart_clock()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4g}", steps_per_s=f"{rate:.1f}")
        return record

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
