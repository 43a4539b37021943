"""The last N finished requests, in memory and bounded: what ``GET /v1/requests/recent`` and
the web page's chart read.

Filled by the route handlers once a request's :class:`~app.service.Outcome` is known (native
and OpenAI-compatible, streaming or not). Entries hold costs and the route, never the prompt
or the answer: anyone with an API key may read them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from app.routes.common import energy_out, route_out
from app.schemas import BudgetOut, RecentRequest, Usage
from app.service import Call, Outcome


class RecentRequests:
    """A thread-safe ring of at most ``size`` :class:`RecentRequest` entries, oldest first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self._entries: deque[RecentRequest] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, call: Call, outcome: Outcome) -> RecentRequest:
        """Record one finished request (the oldest entry drops out when full)."""
        b = call.budget
        entry = RecentRequest(
            id=outcome.id, endpoint=call.endpoint, finished_at=time.time(),
            variant=outcome.variant, pinned=call.variant is not None,
            finish_reason=outcome.finish_reason,
            usage=Usage(prompt_tokens=outcome.prompt_tokens,
                        completion_tokens=outcome.completion_tokens),
            budget=BudgetOut(latency_ms=b.latency_ms, min_quality=b.min_quality,
                             max_joules=b.max_joules),
            energy=energy_out(outcome), latency_ms=outcome.latency_ms,
            queue_ms=outcome.queue_ms, route=route_out(outcome))
        with self._lock:
            self._entries.append(entry)
        return entry

    def latest(self, limit: int | None = None) -> list[RecentRequest]:
        """The newest ``limit`` entries (all when ``None``), oldest first."""
        with self._lock:
            entries = list(self._entries)
        return entries if limit is None else entries[max(0, len(entries) - limit):]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
