"""Measure a variant's cost on this host: prefill and decode milliseconds per token."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from models.engine.base import Engine, GenerationParams
from models.manifest import Calibration


def time_generation(
    engine: Engine, prompt_ids: Sequence[int], new_tokens: int
) -> tuple[float, float]:
    """One greedy run ignoring EOS; return (seconds to first token, seconds for the rest)."""
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = None
    for chunk in engine.stream(prompt_ids, params):
        if first is None:
            first = time.perf_counter()
        if chunk.finish_reason:
            break
    end = time.perf_counter()
    assert first is not None
    return first - start, end - first


def calibrate(engine: Engine, prompt_ids: Sequence[int], new_tokens: int = 64, repeats: int = 3,
              threads: int = 2, device: str = "cpu") -> Calibration:
    """Median over ``repeats`` runs after one warm-up run."""
    time_generation(engine, prompt_ids, min(new_tokens, 8))
    ttfts, decodes = [], []
    for _ in range(repeats):
        ttft, rest = time_generation(engine, prompt_ids, new_tokens)
        ttfts.append(ttft)
        decodes.append(rest / max(1, new_tokens - 1))
    decode_s = statistics.median(decodes)
    return Calibration(
        prefill_ms_per_token=1000 * statistics.median(ttfts) / len(prompt_ids),
        decode_ms_per_token=1000 * decode_s,
        decode_tokens_per_s=1 / decode_s,
        threads=threads,
        device=device,
    )
