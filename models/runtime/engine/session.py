"""onnxruntime sessions as the service runs them: thread pools (shared or a session's own,
with bounded spinning), session options, execution providers, and the aligned, lazily-backed
buffers bound to them."""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from models.runtime import kernels

_global_pool_threads: int | None = None  # onnxruntime's environment is one per process
SPIN_US = 1000  # how long an idle thread of a session's own pool spins before it sleeps


def use_global_thread_pool(threads: int) -> bool:
    """Make every session this process creates from now on share one intra-op thread pool of
    ``threads`` (call before the first session; a serving process does, at start-up).

    Sessions that take turns on the same cores — a lane interleaving variants' steps, a
    speculative draft and its target — otherwise each keep their own pool, whose threads (by
    onnxruntime's default) spin after their work and steal the cores from the next session's
    (what that cost speculative decoding: docs/benchmarks.md, Threads per rung);
    :func:`session_options` bounds the spin of a pool of a session's own instead. Returns
    whether the shared pool is in use."""
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
    to the next) and between one decode step and the next (a pool stopped at the end of every
    run has to be woken at the start of the next), short enough that the cores soon belong to
    the process's other sessions (a one-core rung's, a speculative draft's). What each choice
    measured: docs/benchmarks.md, Threads per rung."""
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
    kernels.register(so)  # greenroute's own operators, where a graph uses them
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


LAZY_BYTES = 1 << 20  # arrays from this size up are mapped, not allocated


def aligned_zeros(shape: Sequence[int], dtype: Any, alignment: int = 64) -> np.ndarray:
    """A zeroed array whose data starts on an ``alignment``-byte boundary (a cache line).

    numpy's buffers start 16 bytes into their allocation; onnxruntime's own are 64-byte
    aligned, and its kernels read a buffer bound from numpy (KV cache, mask, logits) a little
    faster when it is too (docs/benchmarks.md, Threads per rung).

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
