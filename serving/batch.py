"""One variant's continuous batch as the lane holds it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from models.runtime.engine.slots import Slots
from serving.job import JobState


@dataclass
class Batch:
    """One variant's continuous batch: its slots, running rows and waiting requests."""

    name: str
    slots: Slots
    running: dict[int, JobState] = field(default_factory=dict)  # row → sequence
    waiting: deque[JobState] = field(default_factory=deque)
    free: list[int] = field(default_factory=list)
    reported: tuple[int, int] = (0, 0)  # speculative rungs: (drafted, accepted) told so far

    def __post_init__(self) -> None:
        self.free = list(range(self.slots.max_batch - 1, -1, -1))  # pop() gives the lowest

    def take_row(self) -> int:
        # lowest free row first: the step's prefix of rows stays short
        self.free.sort(reverse=True)
        return self.free.pop()

    def new_speculation(self) -> tuple[int, int] | None:
        """A speculative rung's drafted and accepted tokens since the last call (None for
        every other variant)."""
        if self.slots.speculation is None:
            return None
        drafted, accepted = self.slots.speculation
        new = (drafted - self.reported[0], accepted - self.reported[1])
        self.reported = (drafted, accepted)
        return new
