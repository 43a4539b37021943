"""Execution lanes: one worker thread per device runs generations one at a time.

One lane per device keeps each request's energy window its own, and inference off the event
loop. The queue is bounded: a full queue refuses at once (429) instead of growing.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The lane's queue is full; ``retry_after_s`` is a whole-second estimate of the wait."""

    def __init__(self, device: str, retry_after_s: int) -> None:
        super().__init__(f"lane {device} is full")
        self.device = device
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """Lane work: ``run`` executes in the lane thread; ``skip`` if cancelled while queued."""

    run: Callable[[], None]
    skip: Callable[[], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class Lane:
    """A bounded queue and the one thread that drains it."""

    def __init__(self, device: str, maxsize: int,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.device = device
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize)
        self._on_depth = on_depth or (lambda _d: None)
        self._busy = False
        self._service_s = 1.0  # EWMA of job run time, for Retry-After and queue-wait estimates
        self._thread = threading.Thread(target=self._loop, name=f"lane-{device}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Waiting plus running jobs."""
        return self._queue.qsize() + int(self._busy)

    @property
    def mean_service_s(self) -> float:
        return self._service_s

    def submit(self, job: Job) -> None:
        """Queue ``job`` or raise :class:`QueueFullError` immediately."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            wait = self._service_s * (self.depth + 1)
            raise QueueFullError(self.device, max(1, math.ceil(wait))) from None
        self._on_depth(self.depth)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                job.skip()
                self._on_depth(self.depth)
                continue
            self._busy = True
            self._on_depth(self.depth)
            started = time.perf_counter()
            try:
                job.run()
            except Exception:  # a job reports its own errors; this only keeps the lane alive
                log.exception("job failed on lane %s", self.device)
            finally:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - started)
                self._busy = False
                self._on_depth(self.depth)

    def stop(self, timeout_s: float) -> bool:
        """Let queued and running jobs finish (up to ``timeout_s``), then end the thread."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()
