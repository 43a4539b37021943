"""The one interface through which the lane reports to the app (metrics, accounting, the power
window): besides each request's own events, these. Called in the lane thread, so each must be
quick; an exception is logged and dropped, never allowed to stop serving."""

from __future__ import annotations

from serving.events import Finished
from serving.job import Job


class LaneObserver:
    """Every report is a no-op here; the app overrides what it records."""

    def request_finished(self, request: Job, finished: Finished) -> None:
        """A request that got a row ended (finished, cancelled, failed or capped): its cost and
        timing."""

    def batch_size(self, variant: str, rows: int) -> None:
        """Rows now in ``variant``'s continuous batch."""

    def queue_depth(self, waiting: int) -> None:
        """Requests waiting for a row on the lane."""

    def speculated(self, variant: str, drafted: int, accepted: int) -> None:
        """Tokens a speculative rung drafted, and those its target kept, in its last step."""
