"""``bench models``' report: the peer verdict tells a graph that is behind from one that the
pairs cannot tell from parity."""

from __future__ import annotations

import statistics

import pytest

from bench.models import median_interval, report


def test_the_interval_brackets_the_median_and_is_reproducible() -> None:
    values = [0.9, 0.95, 0.97, 1.0, 1.01, 1.02, 1.05, 1.1, 1.3, 0.7, 0.99]
    lo, hi = median_interval(values)
    assert lo <= statistics.median(values) <= hi
    assert lo > min(values) and hi < max(values)
    assert median_interval(values) == (lo, hi)
    assert median_interval([0.98] * 9) == (pytest.approx(0.98), pytest.approx(0.98))


def test_the_verdict_separates_behind_from_within_noise() -> None:
    figures = {
        "results": {}, "prompt_tokens": 32, "new_tokens": 128, "runs": 7, "rounds": 3,
        "threads": 2,
        "peer_pair_ratios": {
            "fast": [1.02, 1.04, 0.99, 1.03, 1.05, 1.01, 1.0],
            "noisy": [0.8, 1.2, 0.9, 1.1, 0.97, 1.05, 0.95, 1.08, 0.85],
            "slow": [0.9, 0.92, 0.91, 0.93, 0.89, 0.94, 0.9],
        }}
    lines = {line.split(" = ")[0].strip(): line for line in report(figures).splitlines()
             if " / genai:" in line}
    assert lines["ours:fast / genai:fast"].endswith(": met")
    assert "MISSED, within noise" in lines["ours:noisy / genai:noisy"]
    assert "MISSED, behind" in lines["ours:slow / genai:slow"]
