"""Recent average power from finished runs: the signal the power cap acts on."""

from __future__ import annotations

import threading
import time
from collections import deque


class PowerWindow:
    """Joules of runs that ended in the last ``window_s`` seconds, over ``window_s``."""

    def __init__(self, window_s: float = 5.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._runs: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, joules: float, now: float | None = None) -> None:
        with self._lock:
            self._runs.append((time.monotonic() if now is None else now, joules))

    def watts(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._runs and self._runs[0][0] < now - self.window_s:
                self._runs.popleft()
            return sum(j for _, j in self._runs) / self.window_s
