"""``bench peers`` without a llama-server: our rungs are measured on a live service, taking
turns, and the report says what was not measured."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.peers import cpu_seconds, report, run_bench


def test_cpu_seconds_reads_this_process() -> None:
    before = cpu_seconds(os.getpid())
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.1


def test_our_rungs_are_measured_and_the_missing_peer_is_said(tiny_ladder: Path) -> None:
    f = run_bench(tiny_ladder, clients=(1, 2), rounds=2, new_tokens=4, threads=2,
                  server="/nonexistent/llama-server", served=True)
    assert f["skipped"] and "GREENROUTE_LLAMA_SERVER" in f["skipped"]
    for n in ("1", "2"):
        engines = f["medians"][n]
        int8 = {f"ours {v}{label}" for v in ("int8", "distilled-int8")  # the tiny ladder has both
                for label in ("", " (served)", " (served, no wide session)")}
        assert {"ours full"} | int8 <= set(engines)
        assert {e for e in engines if "int8" in e} == int8
        for name, m in engines.items():
            runs = f["runs"][n][name]
            assert len(runs) == 2  # every engine once per round
            assert all(r["tokens"] == 4 * int(n) * max(2, 16 // int(n)) for r in runs)
            assert m["tok_s"] > 0 and m["j_per_token"] >= 0
    text = report(f)
    assert "llama-server not measured" in text and "ours int8 / ours full" in text
    assert "ours int8 (served) / ours full" in text
    assert "ours distilled-int8 / ours full" in text  # no llama.cpp pair, measured beside
