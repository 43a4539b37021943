"""One engine interface for every runtime: load, warm up, stream tokens, cancel.

Subclasses produce raw next-token ids (``_token_ids``); this base turns them into text chunks with
EOS, stop sequences, ``max_new_tokens``, context limits and cancellation handled in one place.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from models.runtime.engine.slots import Slots

FinishReason = Literal["stop", "length", "cancelled", "energy"]  # energy: max_joules reached


class EngineError(Exception):
    """Base of the engine's own errors (never raised for a caller's transient state)."""


class ContextOverflowError(EngineError, ValueError):
    """Prompt tokens + ``max_new_tokens`` exceed the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} exceeds the model's context of "
            f"{context_length} tokens"
        )


class VariantLoadError(EngineError):
    """A variant's files are missing or unreadable; the message says which and why."""


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. ``temperature == 0`` means greedy; ``top_k == 0`` disables top-k."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep decoding past EOS (benchmarks and calibration)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class Chunk:
    """Text released by one decoding step (may be empty while a stop prefix is held back)."""

    text: str
    token_id: int
    index: int  # 0-based position among generated tokens
    finish_reason: FinishReason | None = None


@dataclass
class GenerationResult:
    """Everything one ``generate`` call produced."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: FinishReason = "length"


@dataclass
class ResultBuilder:
    """One sequence's chunks gathered into its :class:`GenerationResult` (for
    :meth:`Engine.generate` and the batched ``generate_many`` alike)."""

    prompt_tokens: int
    eos_token_ids: frozenset[int]
    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = "length"

    def add(self, chunk: Chunk) -> None:
        self.parts.append(chunk.text)
        if chunk.token_id >= 0 and chunk.token_id not in self.eos_token_ids:
            self.token_ids.append(chunk.token_id)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason

    def result(self) -> GenerationResult:
        return GenerationResult("".join(self.parts), self.token_ids, self.prompt_tokens,
                                self.finish_reason)


class StopMatcher:
    """Incremental detokenisation with stop-sequence hold-back.

    Tokens are detokenised one at a time (``tokenizers``' ``DecodeStream``: constant work per
    token, and nothing released until a multi-byte character is complete). Text that might be
    the start of a stop sequence is held back until it is known not to be; a matched stop
    sequence is cut off and ends generation.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text safe to release, whether a stop sequence matched)."""
        self._ids.append(token_id)
        piece = self._stream.step(self._tok, token_id)
        if piece:
            self.text += piece
        for s in self._stop:
            at = self.text.find(s, max(0, self._emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                out = self.text[self._emitted :]
                self._emitted = len(self.text)
                return out, True
        safe = len(self.text)
        for s in self._stop:
            for k in range(min(len(s) - 1, safe - self._emitted), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        out = self.text[self._emitted : safe]
        self._emitted = safe
        return out, False

    def flush(self) -> str:
        """Release whatever was held back (generation ended without a stop match), including
        bytes of a character the stream never completed, as one whole decode renders them."""
        whole = self._tok.decode(self._ids, skip_special_tokens=True)  # once per sequence
        if whole.startswith(self.text):
            self.text = whole
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out


class OutputStream:
    """A sequence's generated token ids → text chunks, with EOS, stop sequences, cancellation
    and ``max_new_tokens`` decided in one place (the engine's own loop and the executor's
    batched steps both use it)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int],
                 params: GenerationParams) -> None:
        self._eos = eos_token_ids
        self._params = params
        self._matcher = StopMatcher(tokenizer, params.stop)
        self.index = -1  # of the last token pushed
        self.produced = 0  # generated tokens that are not EOS
        self.finish_reason: FinishReason | None = None

    def push(self, token_id: int, cancelled: bool = False) -> Chunk:
        """One generated token; the chunk's ``finish_reason`` is set when it ends the sequence."""
        self.index += 1
        index, params = self.index, self._params
        if token_id in self._eos and not params.ignore_eos:
            return self._finish(Chunk(self._matcher.flush(), token_id, index), "stop")
        self.produced += 1
        text, stopped = self._matcher.push(token_id)
        if stopped:
            return self._finish(Chunk(text, token_id, index), "stop")
        if cancelled:
            return self._finish(Chunk(text + self._matcher.flush(), token_id, index),
                                "cancelled")
        if index + 1 >= params.max_new_tokens:
            return self._finish(Chunk(text + self._matcher.flush(), token_id, index), "length")
        return Chunk(text, token_id, index)

    def end(self, reason: FinishReason) -> Chunk:
        """End without a new token (cancelled while waiting, energy cap, runtime's own end)."""
        return self._finish(Chunk(self._matcher.flush(), -1, self.index), reason)

    def _finish(self, chunk: Chunk, reason: FinishReason) -> Chunk:
        chunk.finish_reason = self.finish_reason = reason
        return chunk


class Engine(ABC):
    """A loaded variant that turns prompt token ids into a stream of text chunks."""

    runtime: str = "abstract"
    # intra-op threads of its sessions (None: the runtime runs its own way, as genai's does;
    # 0: a speculative pair whose target and draft differ)
    threads: int | None = None
    wide_threads: int = 0  # threads of a second session for wide forwards (0: none)
    wide_from_rows: int = 0  # the rows (or prompt tokens) from which it runs

    def __init__(self, tokenizer: Tokenizer, context_length: int, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)

    def own_slots(self, max_batch: int, max_len: int) -> Slots | None:
        """Slots of its own making (the speculative pair's), or None: :func:`slots_for` then
        picks batched or serial slots for the graph."""
        return None

    @abstractmethod
    def _token_ids(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[int]:
        """Yield generated token ids one by one, at most ``params.max_new_tokens``."""

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int,
                   limit: int | None = None) -> None:
        """The one check that a request fits: :class:`ContextOverflowError` unless prompt and
        answer fit ``limit`` tokens (the context; the executor passes a batch row's length)."""
        if prompt_tokens < 1:
            raise ValueError("prompt must contain at least one token")
        limit = self.context_length if limit is None else limit
        if prompt_tokens + max_new_tokens > limit:
            raise ContextOverflowError(prompt_tokens, max_new_tokens, limit)

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk]:
        """Generate incrementally; the last chunk carries ``finish_reason``.

        ``cancel`` is checked between tokens; closing the iterator also stops decoding.
        """
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        out = OutputStream(self.tokenizer, self.eos_token_ids, params)
        tokens = self._token_ids(prompt_ids, params)
        try:
            for token_id in tokens:
                chunk = out.push(token_id, cancel is not None and cancel.is_set())
                yield chunk
                if chunk.finish_reason:
                    return
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        # The runtime ended on its own (its own length limit): nothing new, just the tail.
        yield out.end("length")

    def generate(
        self,
        prompt: str | Sequence[int],
        params: GenerationParams,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Non-streaming convenience over :meth:`stream`."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        out = ResultBuilder(len(ids), self.eos_token_ids)
        for chunk in self.stream(ids, params, cancel):
            out.add(chunk)
        return out.result()

    def warmup(self) -> None:
        """Run a short generation so first-request latency excludes lazy initialisation."""
        ids = self.encode("def main():") or [0]
        for _ in self.stream(ids, GenerationParams(max_new_tokens=4)):
            pass

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release runtime resources."""
