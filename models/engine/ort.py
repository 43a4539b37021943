"""Our decoding loop over an optimum-exported causal-LM graph with KV cache (onnxruntime only).

Each step's ``present.*`` outputs are fed back as the next step's ``past_key_values.*`` inputs,
never recomputed. On CPU they are numpy arrays passed to ``session.run`` (measured faster than
``IOBinding`` there: fewer Python→C++ calls per step); on CUDA they stay ``OrtValue``s on the GPU
through ``IOBinding`` and only the logits come back to the host for sampling.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.engine.base import Engine, GenerationParams, VariantLoadError
from models.engine.sampling import make_rng, select_token

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


_global_pool_threads: int | None = None  # onnxruntime's environment is one per process
SPIN_US = 1000  # how long an idle thread of a session's own pool spins before it sleeps


def use_global_thread_pool(threads: int) -> bool:
    """Make every session this process creates from now on share one intra-op thread pool of
    ``threads`` (call before the first session; a serving process does, at start-up).

    Sessions that take turns on the same cores — a lane interleaving variants' steps, a
    speculative draft and its target — otherwise each keep their own pool, whose threads (by
    onnxruntime's default) spin after their work and steal the cores from the next session's:
    measured here, speculative decoding ran at 0.85x full with such pools and 1.4-1.5x with one
    shared pool (both models at their usual speed); :func:`session_options` bounds the spin of
    a pool of a session's own instead. Returns whether the shared pool is in use."""
    global _global_pool_threads
    if _global_pool_threads is not None:
        return _global_pool_threads == threads
    try:
        ort.set_global_thread_pool_sizes(threads, 1)
    except Exception:  # the environment exists already: sessions keep their own pools
        return False
    _global_pool_threads = threads
    return True


def share_pool_if_uniform(threads: int, variant_threads: Iterable[int]) -> bool:
    """One shared pool of ``threads`` when every variant runs on that many (the lane
    interleaves them on the same cores); otherwise each session keeps its own (onnxruntime
    allows no per-session pool beside the shared one), whose threads spin for at most
    :data:`SPIN_US` when idle, and a one-thread session has no pool threads at all. Returns
    whether the shared pool is in use."""
    if all(n == threads for n in variant_threads):
        return use_global_thread_pool(threads)
    return False


def session_options(threads: int) -> ort.SessionOptions:
    """Sequential execution with ``threads`` intra-op threads (the process's shared pool when
    :func:`use_global_thread_pool` set one up) and full graph optimisation.

    A pool of the session's own spins while it waits for work, for at most
    :data:`SPIN_US`: long enough to span the gaps inside a run (one operator's parallel section
    to the next: int8 decoded at 0.74x onnxruntime-genai's speed with spinning off) and between
    one decode step and the next (a pool stopped at the end of every run had to be woken at the
    start of the next: 0.88-0.97x genai's step time), short enough that the cores soon belong
    to the process's other sessions (a one-core rung's, a speculative draft's)."""
    so = ort.SessionOptions()
    if _global_pool_threads is not None:
        if threads != _global_pool_threads:  # onnxruntime: every session then uses the pool
            raise ValueError(f"this process shares one pool of {_global_pool_threads} "
                             f"threads: a session cannot have {threads}")
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


LAZY_BYTES = 1 << 20  # arrays from this size up are mapped, not allocated


def aligned_zeros(shape: Sequence[int], dtype: Any, alignment: int = 64) -> np.ndarray:
    """A zeroed array whose data starts on an ``alignment``-byte boundary (a cache line).

    numpy's buffers start 16 bytes into their allocation; onnxruntime's own are 64-byte
    aligned, and its kernels read a buffer bound from numpy (KV cache, mask, logits) a little
    faster when it is too (measured here: 1.5 % per decode step, full and int8 alike).

    A large array is an anonymous memory map (page-aligned): its pages cost memory only once
    written, so a KV buffer sized for every row at full length holds only what rows use.
    ``np.zeros`` does not promise that: glibc serves a calloc below its mmap threshold (which
    rises to 32 MB after large frees) from the heap and zeroes it, and the default ladder's
    25 MB per-layer KV buffers were all resident from start-up (9.5 GB; 2 GB mapped)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes >= LAZY_BYTES and alignment <= mmap.PAGESIZE:
        buf = mmap.mmap(-1, nbytes)
        return np.frombuffer(buf, dtype=np.uint8, count=nbytes).view(dtype).reshape(
            tuple(shape))
    raw = np.zeros(nbytes + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


def providers_for(device: str) -> list[str]:
    """``cuda`` → CUDA then CPU; anything else → CPU only."""
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def shares_kv_buffer(variant_dir: Path) -> bool:
    """``past_present_share_buffer`` from the variant's ``genai_config.json`` (the builder sets
    it for its GroupQueryAttention graphs; optimum's concat graphs never share)."""
    path = variant_dir / "genai_config.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get("search", {}).get("past_present_share_buffer"))


def _head_dim_from_config(variant_dir: Path) -> int:
    """The KV head size when the graph leaves it symbolic (onnxruntime-genai's builder does):
    from the variant's ``genai_config.json`` or ``config.json``."""
    for name in ("genai_config.json", "config.json"):
        path = variant_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("model", {}).get("decoder", cfg)
            if "head_size" in cfg or "head_dim" in cfg:
                return int(cfg.get("head_size") or cfg["head_dim"])
            if "hidden_size" in cfg and "num_attention_heads" in cfg:
                return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    raise VariantLoadError(f"{variant_dir}: the graph's KV head size is symbolic and no "
                           "config.json/genai_config.json gives it")


class OrtEngine(Engine):
    """KV-cached greedy/sampled decoding over one ONNX session."""

    runtime = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        tokenizer: Tokenizer,
        context_length: int,
        eos_token_ids: Sequence[int],
        device: str = "cpu",
        threads: int = 2,
    ) -> None:
        super().__init__(tokenizer, context_length, eos_token_ids)
        if not model_path.is_file():
            raise VariantLoadError(f"ONNX file not found: {model_path}")
        self.threads = threads
        try:
            self.session = ort.InferenceSession(
                str(model_path), session_options(threads), providers=providers_for(device)
            )
        except Exception as err:  # onnxruntime raises several unrelated types for bad files
            raise VariantLoadError(f"cannot load {model_path}: {err}".splitlines()[0]) from err
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = sorted(
            (int(m.group(1)), m.group(2) == "value", name)
            for name in inputs
            if (m := _PAST.match(name))
        )
        if "input_ids" not in inputs or not past:
            raise VariantLoadError(f"{model_path} is not a KV-cache decoder graph "
                                   "(needs input_ids and past_key_values.N.key/value)")
        self._past_names = [name for _, _, name in past]
        self._present_names = [n.replace("past_key_values", "present") for n in self._past_names]
        first = inputs[self._past_names[0]]
        self._kv_heads = int(first.shape[1])
        self._head_dim = (first.shape[3] if isinstance(first.shape[3], int)
                          else _head_dim_from_config(model_path.parent))
        self._kv_dtype = _NP_DTYPES[first.type]
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        # GroupQueryAttention graphs (genai builder) can write the new K/V in place into one
        # buffer per layer: no per-step concat or output allocation
        self.shared_kv = self._has_mask and shares_kv_buffer(model_path.parent)
        logits_out = self.session.get_outputs()[0]
        self._vocab, self._logits_dtype = int(logits_out.shape[-1]), _NP_DTYPES[logits_out.type]
        self._output_names = ["logits", *self._present_names]
        # positions for single-sequence decoding: views of one array, no per-step allocation
        self._arange = np.arange(context_length, dtype=np.int64)[None, :]

    # -- one forward step -------------------------------------------------------------------
    def _empty_past(self, batch: int) -> list[Any]:
        shape = [batch, self._kv_heads, 0, self._head_dim]
        if self.device == "cpu":
            return [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past_names]
        return [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self.device, 0)
            for _ in self._past_names
        ]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[Any],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Any]]:
        """Run ``input_ids`` [B, T] after ``past``; return (logits [B, T, V], new past).

        ``attention_mask`` covers past + new tokens; positions default to its running count.
        """
        feed: dict[str, Any] = {"input_ids": input_ids}
        if self._has_mask:
            feed["attention_mask"] = attention_mask
        if self._has_positions:
            if position_ids is None:
                position_ids = np.cumsum(attention_mask, axis=1, dtype=np.int64) - 1
                position_ids = np.maximum(position_ids, 0)[:, -input_ids.shape[1] :]
            feed["position_ids"] = position_ids
        if self.device == "cpu":
            feed.update(zip(self._past_names, past, strict=True))
            outputs = self.session.run(self._output_names, feed)
            return outputs[0], outputs[1:]
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self._past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), list(values[1:])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of a whole sequence in one pass (quality evaluation)."""
        arr = np.asarray([ids], dtype=np.int64)
        out, _ = self.forward(arr, np.ones_like(arr), self._empty_past(1))
        return out[0]

    # -- decoding ---------------------------------------------------------------------------
    def _token_ids(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[int]:
        if self.shared_kv:
            yield from self._token_ids_shared(prompt_ids, params)
            return
        rng = make_rng(params.seed)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        length = ids.shape[1]
        ones = np.ones((1, length + params.max_new_tokens), dtype=np.int64)
        past = self._empty_past(1)
        logits, past = self.forward(ids, ones[:, :length], past, self._arange[:, :length])
        for _ in range(params.max_new_tokens):
            token = select_token(logits[0, -1], params, rng)
            yield token
            length += 1
            if length > ones.shape[1]:
                return
            logits, past = self.forward(np.asarray([[token]], dtype=np.int64),
                                        ones[:, :length], past,
                                        self._arange[:, length - 1 : length])

    def _token_ids_shared(self, prompt_ids: Sequence[int],
                          params: GenerationParams) -> Iterator[int]:
        """Decoding with one KV buffer per layer bound as both past and present: the graph
        writes each step's K/V in place (as onnxruntime-genai does). Every input and output of
        a decode step is bound once; a step writes two integers and runs."""
        rng = make_rng(params.seed)
        length = len(prompt_ids)
        max_len = length + params.max_new_tokens
        binding = self.session.io_binding()
        shape = [1, self._kv_heads, max_len, self._head_dim]
        # Bound values point into numpy arrays; they stay referenced from this frame until
        # decoding ends (the IOBinding wrapper keeps them too, but does not promise to).
        buffers = []
        for past, present in zip(self._past_names, self._present_names, strict=True):
            if self.device == "cpu":
                buffer = ort.OrtValue.ortvalue_from_numpy(aligned_zeros(shape, self._kv_dtype))
            else:
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype,
                                                                   self.device, 0)
            buffers.append(buffer)
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        # the mask spans the whole buffer; its count of ones is the sequence so far
        mask = aligned_zeros((1, max_len), np.int64)
        mask[0, :length] = 1
        buffers.append(ort.OrtValue.ortvalue_from_numpy(mask))
        binding.bind_ortvalue_input("attention_mask", buffers[-1])
        binding.bind_cpu_input("input_ids", np.asarray([prompt_ids], dtype=np.int64))
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()[0, -1]
        step = aligned_zeros((1, 1), np.int64)
        step_logits = aligned_zeros((1, 1, self._vocab), self._logits_dtype)
        buffers += [ort.OrtValue.ortvalue_from_numpy(step),
                    ort.OrtValue.ortvalue_from_numpy(step_logits)]
        binding.bind_ortvalue_input("input_ids", buffers[-2])
        binding.bind_ortvalue_output("logits", buffers[-1])
        for produced in range(1, params.max_new_tokens + 1):
            token = select_token(logits, params, rng)
            yield token
            if produced == params.max_new_tokens:
                return
            step[0, 0] = token
            mask[0, length] = 1
            length += 1
            self.session.run_with_iobinding(binding)
            logits = step_logits[0, -1]

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: GenerationParams
    ) -> list[list[int]]:
        """Decode several prompts together (left-padded), ``max_new_tokens`` each, no early stop.

        Used for batch throughput measurements; rows share one random generator.
        """
        for p in prompts:
            self.check_fits(len(p), params.max_new_tokens)
        width = max(len(p) for p in prompts)
        if not self._has_positions and any(len(p) != width for p in prompts):
            # no position_ids input (genai builder graphs): positions and the attention span
            # come from each row's mask count, which assumes no left padding
            raise ValueError("this graph batches prompts of equal length only")
        pad = next(iter(self.eos_token_ids), 0)
        ids = np.full((len(prompts), width), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        rng = make_rng(params.seed)
        past = self._empty_past(len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        for _ in range(params.max_new_tokens):
            logits, past = self.forward(ids, mask, past)
            nxt = [select_token(logits[row, -1], params, rng) for row in range(len(prompts))]
            for row, token in enumerate(nxt):
                out[row].append(token)
            ids = np.asarray(nxt, dtype=np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        return out
