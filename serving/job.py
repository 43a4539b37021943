"""A request as the executor takes it, and its per-sequence state while it runs."""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field

from models.runtime.engine.base import Chunk, FinishReason, GenerationParams, OutputStream
from models.runtime.engine.slots import Sampler
from serving.events import Chunks, Emit, Finished
from telemetry.base import EnergyReading

STREAM_FLUSH_S = 0.005  # streamed tokens are delivered in batches at most this often (seconds)


@dataclass
class Job:
    """One generation the executor should run on ``variant`` (already routed)."""

    prompt_ids: list[int]
    params: GenerationParams
    variant: str
    max_joules: float | None = None  # hard cap on its attributed energy
    stream: bool = False  # deliver chunks as produced (else once, at the end)
    cancel: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    latency_ms: float = math.inf  # its latency budget (a routing target, from ``arrived``)
    timeout_at: float = math.inf  # perf_counter time after which the lane stops it

    def expired(self, now: float) -> bool:
        """Cancelled by its caller, or past its request timeout."""
        return self.cancel.is_set() or now > self.timeout_at

    def slack_ms(self, now: float) -> float:
        """Milliseconds left to its latency budget at ``now`` (``inf``: none)."""
        return self.latency_ms - 1000 * (now - self.arrived)


class JobState:
    """A request with a row: its sampler, output stream, timing and buffered chunks."""

    def __init__(self, job: Job, out: OutputStream, emit: Emit) -> None:
        self.job = job
        self.sampler = Sampler(job.params)
        self.out = out
        self.emit = emit
        self.row = -1
        self.prefilled = 0  # prompt tokens in its row so far (prefills may come in parts)
        self.last_token = -1
        self.admitted = 0.0
        self.first_token = 0.0
        self.last_time = 0.0
        self._held: list[Chunk] = []
        self._flushed = -math.inf

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def ready(self) -> bool:
        """Its whole prompt is in its row: it takes part in steps."""
        return self.prefilled >= len(self.job.prompt_ids)

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.job.params.max_new_tokens - (self.out.index + 1)

    def push(self, token: int, now: float) -> Chunk:
        """Take one generated token; buffer its chunk (and deliver when due)."""
        self.last_token = token
        self.first_token = self.first_token or now
        self.last_time = now
        chunk = self.out.push(token, self.job.cancel.is_set())
        self._hold(chunk, now)
        return chunk

    def end(self, reason: FinishReason, now: float) -> Chunk:
        chunk = self.out.end(reason)
        self._hold(chunk, now)
        return chunk

    def _hold(self, chunk: Chunk, now: float) -> None:
        # Waking the event loop per token slows decoding on few cores: a stream is flushed at
        # most every STREAM_FLUSH_S (its first token at once), a whole answer once at the end.
        self._held.append(chunk)
        if chunk.finish_reason or (self.job.stream and now - self._flushed >= STREAM_FLUSH_S):
            self.flush(now)

    def flush(self, now: float) -> None:
        if self._held:
            self.emit(Chunks(self._held))
            self._held, self._flushed = [], now

    def finished(self, energy: EnergyReading) -> Finished:
        """Its end as the lane reports it, with its ledger share ``energy``."""
        out = self.out
        return Finished(out.finish_reason or "length", len(self.job.prompt_ids),
                        out.produced, out.index + 1, energy, self.admitted, self.first_token,
                        self.last_time)
