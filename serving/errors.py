"""The executor's domain errors; ``app/http_errors.py`` maps them to HTTP statuses."""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error the executor raises for a request it will not run."""


class QueueFullError(ServingError):
    """No free row for the variant and the lane's queue is full; ``retry_after_s`` is a
    whole-second estimate of when a row frees."""

    def __init__(self, device: str, retry_after_s: int, variant: str | None = None) -> None:
        super().__init__(f"the {device} lane is full; retry in about {retry_after_s} s")
        self.device = device
        self.retry_after_s = retry_after_s
        self.variant = variant  # the variant it was routed to (set by Executor.admit)


class UnknownVariantError(ServingError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown variant {name!r}; known: auto, {', '.join(known)}")
        self.name = name


class VariantUnavailableError(ServingError):
    def __init__(self, name: str) -> None:
        super().__init__(f"variant {name!r} failed to load")
        self.name = name


class ShuttingDownError(ServingError):
    """The executor is draining: it finishes what it has and takes nothing new."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class LaneFailedError(ServingError):
    """The device lane died of an error outside any one request (a meter read, its own
    bookkeeping): what it held is failed with this, and it takes nothing new. The process is
    unhealthy (``/health`` says so) and is to be restarted."""

    def __init__(self, device: str, cause: BaseException | None = None) -> None:
        super().__init__(f"the {device} lane failed; the service must be restarted")
        self.device = device
        self.cause = cause


class PowerCappedError(ServingError):
    """The device is over its power cap, the request is already on the cheapest variant its
    floor allows (or pinned, which cannot shed), and work is queued: refused, not added."""

    def __init__(self, variant: str, watts: float, cap: float, retry_after_s: int) -> None:
        super().__init__(f"device power {watts:.1f} W is over the cap of {cap:g} W; retry in "
                         f"about {retry_after_s} s")
        self.variant = variant
        self.retry_after_s = retry_after_s
