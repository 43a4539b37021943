"""True continuous batching over one shared KV buffer per layer (see :mod:`slots`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from models.runtime import kernels
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.rows import Sampler, Slots, StepResult
from models.runtime.engine.session import aligned_zeros


class KVSlots(Slots):
    """True continuous batching over one shared KV buffer per layer (see the module doc)."""

    batched = True
    kind = "shared-kv-batch"
    chunked = True

    def __init__(self, engine: OrtEngine, max_batch: int, max_len: int,
                 verify_positions: int = 0) -> None:
        if not engine.shared_kv:
            raise ValueError("KVSlots needs a GroupQueryAttention graph with a shared KV buffer")
        super().__init__(engine, max_batch, min(max_len, engine.context_length))
        self.ort_engine = engine
        e = engine
        b, length = self.max_batch, self.max_len
        kv = self.layout = e.kv
        self._kv_type = kv.kv_dtype
        self._row_shape = [kv.kv_heads, length, kv.head_dim]
        self._row_bytes = int(np.prod(self._row_shape)) * np.dtype(kv.kv_dtype).itemsize
        self._dev = "cuda" if e.device == "cuda" else "cpu"
        shape = [b, *self._row_shape]
        if self._dev == "cpu":  # lazily backed: untouched rows cost no memory
            self._kv = [aligned_zeros(shape, kv.kv_dtype) for _ in kv.past_names]
            self._ptrs = [int(a.ctypes.data) for a in self._kv]
        else:
            self._kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, kv.kv_dtype, "cuda", 0)
                        for _ in kv.past_names]
            self._ptrs = [int(v.data_ptr()) for v in self._kv]  # type: ignore[attr-defined]
        # a free row holds one (meaningless) token, so a step over a prefix that includes it
        # stays well-formed; its logits are never read
        self.mask = aligned_zeros((b, length), np.int64)
        self.mask[:, 0] = 1
        self.lengths = np.zeros(b, dtype=np.int64)  # tokens whose K/V a row holds
        self._high = np.zeros(b, dtype=np.int64)  # the most each row held before a release
        self._ids = aligned_zeros((b, 1), np.int64)
        self._logits = aligned_zeros((b, 1, kv.vocab), kv.logits_dtype)
        # bindings made once and reused, each with the session it belongs to
        self._step_bindings: dict[int, tuple[ort.InferenceSession, ort.IOBinding]] = {}
        self._row_bindings: dict[int, ort.IOBinding] = {}
        self._forward_bindings: dict[tuple[int, bool], tuple[ort.InferenceSession,
                                                            ort.IOBinding]] = {}
        # forward_rows: up to ``verify_positions`` new positions a row, in one forward of the
        # engine's verify graph (lazily backed buffers, bindings per width and positions)
        self.verify_positions = verify_positions if engine.verify_session is not None else 0
        cap = self.max_batch * self.verify_positions
        self._vids = aligned_zeros((max(cap, 1),), np.int64)
        self._vlogits = aligned_zeros((max(cap, 1) * kv.vocab,), kv.logits_dtype)
        self._vcounts = aligned_zeros((b,), np.int32)
        self._verify_bindings: dict[tuple[int, int], ort.IOBinding] = {}

    @property
    def kv_bytes(self) -> int:
        """Every layer's K and V buffers with all rows at ``max_len`` (pages are touched only
        as rows fill, so this is the worst case, not what is resident now)."""
        return len(self._kv) * self.max_batch * self._row_bytes

    @property
    def kv_written_bytes(self) -> int:
        """Positions each row has ever held, in bytes over every layer: the pages of the
        lazily-backed buffers that are resident (to a page per head). It grows while rows
        first reach new lengths and is bounded by ``kv_bytes``. Read at scrape time, off the
        hot path (a release or truncation records its row's length)."""
        positions = int(np.maximum(self._high, self.lengths).sum())
        return len(self._kv) * positions * (self._row_bytes // self.max_len)

    def _bind_kv(self, binding: ort.IOBinding, first_row: int, rows: int) -> None:
        shape = [rows, *self._row_shape]
        offset = first_row * self._row_bytes
        names = zip(self.layout.past_names, self.layout.present_names, self._ptrs, strict=True)
        for past, present, ptr in names:
            binding.bind_input(past, self._dev, 0, self._kv_type, shape, ptr + offset)
            binding.bind_output(present, self._dev, 0, self._kv_type, shape, ptr + offset)

    def _step_binding(self, rows: int) -> tuple[ort.InferenceSession, ort.IOBinding]:
        """The session and binding of a step over rows ``[0, rows)``: made once per prefix
        size (on the engine's session for that width), reused."""
        made = self._step_bindings.get(rows)
        if made is None:
            session = self.ort_engine.session_for(rows)
            binding = session.io_binding()
            self._bind_kv(binding, 0, rows)
            width = self.max_len
            binding.bind_input("attention_mask", "cpu", 0, np.int64, [rows, width],
                               int(self.mask.ctypes.data))
            binding.bind_input("input_ids", "cpu", 0, np.int64, [rows, 1],
                               int(self._ids.ctypes.data))
            binding.bind_output("logits", "cpu", 0, self._logits.dtype,
                                [rows, 1, self._logits.shape[2]], int(self._logits.ctypes.data))
            made = self._step_bindings[rows] = (session, binding)
        return made

    def length(self, row: int) -> int:
        return int(self.lengths[row])

    def forward(self, row: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` to ``row`` in one pass; logits ``[len(token_ids), vocab]``.

        A prefill is this at length 0; a speculative verification is this over the draft.
        """
        start, count = int(self.lengths[row]), len(token_ids)
        if count < 1 or start + count > self.max_len:
            raise ValueError(f"row {row} holds {start} tokens: {count} more exceed its "
                             f"{self.max_len}")
        self.mask[row, start : start + count] = 1
        session = self.ort_engine.session_for(count)
        key = (row, session is not self.ort_engine.session)
        made = self._forward_bindings.get(key)
        if made is None:  # the row's K/V and mask, bound once (120 tensors on SmolLM2)
            binding = session.io_binding()
            self._bind_kv(binding, row, 1)
            binding.bind_input("attention_mask", "cpu", 0, np.int64, [1, self.max_len],
                               int(self.mask.ctypes.data) + row * self.max_len * 8)
            made = self._forward_bindings[key] = (session, binding)
        session, binding = made
        binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        self.lengths[row] = start + count
        return binding.get_outputs()[-1].numpy()[0]  # logits: bound last

    def forward_rows(self, rows: Sequence[int],
                     token_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Append each row's tokens, all rows in one forward of the verify graph (several new
        positions per row after its past, at any batch); each row's logits ``[len(tokens),
        vocab]`` (views, valid until the next call). Without a verify graph (or for more
        positions than it was sized for) the rows go apart (:meth:`_forward_rows_apart`).

        The forward spans rows ``[0, width)`` and ``s`` positions (the most any row appends);
        ``new_counts`` tells the operator each row's real ones: a shorter row's others are
        padding and every other row of the prefix takes none, so no row needs room beyond its
        own tokens and nothing else is written."""
        s = max((len(t) for t in token_lists), default=0)
        if not 1 <= s <= self.verify_positions or any(not t for t in token_lists):
            return self._forward_rows_apart(rows, token_lists)
        for row, toks in zip(rows, token_lists, strict=True):
            at = int(self.lengths[row])
            if at < 1 or at + len(toks) > self.max_len:
                raise ValueError(f"row {row} holds {at} tokens: {len(toks)} more do not fit "
                                 f"its {self.max_len}")
        width = max(rows) + 1
        ids = self._vids[: width * s].reshape(width, s)
        ids.fill(0)
        counts = self._vcounts[:width]
        counts.fill(0)
        for row, toks in zip(rows, token_lists, strict=True):
            at = int(self.lengths[row])
            ids[row, : len(toks)] = toks
            counts[row] = len(toks)
            self.mask[row, at : at + len(toks)] = 1
        try:
            self.ort_engine.verify_session.run_with_iobinding(  # type: ignore[union-attr]
                self._verify_binding(width, s))
        except Exception:
            for row, toks in zip(rows, token_lists, strict=True):
                at = int(self.lengths[row])
                self.mask[row, at : at + len(toks)] = 0
            raise
        logits = self._vlogits[: width * s * self.layout.vocab].reshape(width, s, -1)
        out = []
        for row, toks in zip(rows, token_lists, strict=True):
            self.lengths[row] += len(toks)
            out.append(logits[row, : len(toks)])
        return out

    def _forward_rows_apart(self, rows: Sequence[int],
                            token_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """:meth:`forward_rows` without the verify graph: the rows appending one token share
        one batched step, every other row takes a forward of its own."""
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        single = [i for i, t in enumerate(token_lists) if len(t) == 1]
        if single:
            logits = self.step_logits([rows[i] for i in single],
                                      [token_lists[i][0] for i in single])
            for x, i in enumerate(single):
                out[i] = logits[x : x + 1].copy()
        for i, t in enumerate(token_lists):
            if len(t) != 1:
                out[i] = self.forward(rows[i], t).copy()
        return out

    def _verify_binding(self, width: int, s: int) -> ort.IOBinding:
        made = self._verify_bindings.get((width, s))
        if made is None:
            session = self.ort_engine.verify_session
            assert session is not None
            made = session.io_binding()
            self._bind_kv(made, 0, width)
            made.bind_input("attention_mask", "cpu", 0, np.int64, [width, self.max_len],
                            int(self.mask.ctypes.data))
            made.bind_input("input_ids", "cpu", 0, np.int64, [width, s],
                            int(self._vids.ctypes.data))
            made.bind_input(kernels.NEW_COUNTS, "cpu", 0, np.int32, [width],
                            int(self._vcounts.ctypes.data))
            made.bind_output("logits", "cpu", 0, self._vlogits.dtype,
                             [width, s, self.layout.vocab], int(self._vlogits.ctypes.data))
            self._verify_bindings[(width, s)] = made
        return made

    def advance(self, row: int, token: int) -> np.ndarray:
        """Append one token to ``row`` alone; its next-token logits ``[vocab]``. The binding
        is made once per row (a draft model calls this k times per speculative round)."""
        at = int(self.lengths[row])
        if at >= self.max_len:
            raise ValueError(f"row {row} is full ({at} tokens)")
        binding = self._row_bindings.get(row)
        if binding is None:
            binding = self.ort_engine.session.io_binding()
            self._bind_kv(binding, row, 1)
            binding.bind_input("attention_mask", "cpu", 0, np.int64, [1, self.max_len],
                               int(self.mask.ctypes.data) + row * self.max_len * 8)
            binding.bind_input("input_ids", "cpu", 0, np.int64, [1, 1],
                               int(self._ids.ctypes.data) + row * 8)
            binding.bind_output("logits", "cpu", 0, self._logits.dtype,
                                [1, 1, self._logits.shape[2]],
                                int(self._logits[row].ctypes.data))
            self._row_bindings[row] = binding
        self._ids[row, 0] = token
        self.mask[row, at] = 1
        self.lengths[row] = at + 1
        self.ort_engine.session.run_with_iobinding(binding)
        return self._logits[row, 0]

    def truncate(self, row: int, length: int) -> None:
        """Roll ``row`` back to its first ``length`` tokens (later K/V is overwritten later)."""
        if not 1 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of {self.lengths[row]} to {length}")
        self._high[row] = max(self._high[row], self.lengths[row])
        self.mask[row, length:] = 0
        self.lengths[row] = length

    def prefill(self, row: int, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        if self.lengths[row]:
            raise ValueError(f"row {row} is in use")
        return sampler(self.forward(row, prompt_ids)[-1])

    def prefill_part(self, row: int, token_ids: Sequence[int], sampler: Sampler,
                     final: bool) -> int | None:
        # a step over a prefix that covers this row meanwhile writes one dummy position at
        # its length, which this part's forward then overwrites
        logits = self.forward(row, token_ids)
        return sampler(logits[-1]) if final else None

    def step(self, rows: Sequence[int], tokens: Sequence[int],
             samplers: Sequence[Sampler]) -> list[int]:
        """Each row's next token; a row's failed sampling raises (:meth:`step_many` reports
        it per row instead)."""
        self.step_logits(rows, tokens)
        out, failed = self._sample_rows(rows, samplers)
        if failed:
            raise next(iter(failed.values()))
        return out

    def step_many(self, rows: Sequence[int], tokens: Sequence[int],
                  samplers: Sequence[Sampler]) -> StepResult:
        self.step_logits(rows, tokens)
        out, failed = self._sample_rows(rows, samplers)
        return StepResult([[t] for t in out], [1] * len(rows), failed)

    def step_logits(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token appended to each of ``rows`` in one forward; their next-token logits
        ``[len(rows), vocab]`` (a view, valid until the next step)."""
        for row, token in zip(rows, tokens, strict=True):
            at = self.lengths[row]
            if at < 1 or at >= self.max_len:
                raise ValueError(f"row {row} (length {at}) cannot take a step")
            self._ids[row, 0] = token
            self.mask[row, at] = 1
            self.lengths[row] = at + 1
        # one forward over the smallest prefix of rows holding them all, nothing copied; rows
        # inside it that take no part decode a dummy token past their end (_aside)
        width = max(rows) + 1
        session, binding = self._step_binding(width)
        with self._aside(rows, width):
            session.run_with_iobinding(binding)
        return self._logits[list(rows), 0]

    @contextmanager
    def _aside(self, rows: Sequence[int], width: int) -> Iterator[None]:
        """While a step over rows ``[0, width)`` runs, every row in that prefix outside
        ``rows`` (free, or a prompt part-way in) holds one dummy position just past its tokens,
        where the forward writes its K/V (the graph writes a row's new position at the end of
        its mask): its own K/V stays intact, and its mask is restored after."""
        taking = set(rows)
        spans = []
        for r in (r for r in range(width) if r not in taking):
            at = max(int(self.lengths[r]), 1)
            if at >= self.max_len:
                raise ValueError(f"row {r} has no room for a batched step's dummy position")
            self.mask[r, at] = 1
            spans.append((r, at))
        try:
            yield
        finally:
            for r, at in spans:
                self.mask[r, at] = 0

    def _sample_rows(self, rows: Sequence[int],
                     samplers: Sequence[Sampler]) -> tuple[list[int], dict[int, Exception]]:
        """Each row's next token from the step's logits. A row whose sampling fails (bad
        logits) fails alone: it is returned among the failures with a placeholder token, and
        the other rows go on."""
        logits = self._logits
        failed: dict[int, Exception] = {}
        out = []
        for row, sampler in zip(rows, samplers, strict=True):
            try:
                out.append(sampler(logits[row, 0]))
            except Exception as err:  # noqa: BLE001 (the row's own fault, reported per row)
                failed[row] = err
                out.append(0)
        return out, failed

    def release(self, row: int) -> None:
        self._high[row] = max(self._high[row], self.lengths[row])
        self.mask[row] = 0
        self.mask[row, 0] = 1
        self.lengths[row] = 0
