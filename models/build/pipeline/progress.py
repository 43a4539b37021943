"""The build's log with a heartbeat: a first build runs for minutes, and a newcomer should
never watch it say nothing for long. Whenever ``every_s`` seconds pass without a line, it says
what the build is doing (what the last line announced) and for how long it has been at it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

Log = Callable[[str], None]


class Progress:
    """``log``, plus a heartbeat thread while used as a context manager (see the module
    doc). Thread-safe: stages log from the build thread, the heartbeat from its own."""

    # the thread looks once a second, so a 29 s threshold keeps lines at most 30 s apart
    def __init__(self, log: Log, every_s: float = 29.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last = self._since = clock()
        self._doing = "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str) -> None:
        with self._lock:
            self._last = self._since = self._clock()
            self._doing = message.strip()
        self._log(message)

    def tick(self) -> bool:
        """Log a heartbeat if ``every_s`` have passed since the last line; whether it did."""
        now = self._clock()
        with self._lock:
            if now - self._last < self.every_s:
                return False
            self._last = now
            line = f"  ... still at: {self._doing} ({now - self._since:.0f} s)"
        self._log(line)
        return True

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._beat, name="build-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()
