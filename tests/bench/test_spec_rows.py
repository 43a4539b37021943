"""bench spec --rows on the tiny ladder's real graphs: both engines serve every row, in one
batch each, and the report says what it measured."""

from __future__ import annotations

from pathlib import Path

from bench.spec_rows import report_rows, run_rows


def test_the_batched_spec_bench_serves_every_row_on_both(tiny_ladder: Path) -> None:
    f = run_rows(tiny_ladder, rows=3, draft="int8", k=3, new_tokens=10, rounds=2, threads=1)
    assert f["rows"] == 3 and len(f["joules_ratio_per_round"]) == 2
    same, total = map(int, f["identical_outputs"].split("/"))
    assert total == 6 and same >= 4  # full's greedy text on both (a near-tie may differ)
    assert all(v > 0 for v in f["tokens_per_s"].values())
    assert 0.0 < f["acceptance_rate"] <= 1.0
    text = report_rows(f)
    assert "3 rows in one batch each" in text and "target <= 0.7" in text
    assert f["batched_verify"] and "one forward a round" in text  # the tiny ladder's graph
    assert len(f["alone_ratio_per_round"]) == 2 and "full-speculative-alone" in text


def test_the_mixed_spec_bench_serves_both_kinds_of_row_in_both_arrangements(
        tiny_ladder: Path) -> None:
    from bench.spec_mixed import report_mixed, run_mixed

    f = run_mixed(tiny_ladder, rows=2, riders=3, draft="int8", k=3, new_tokens=10, rounds=2,
                  threads=1)
    same, total = map(int, f["identical_outputs"].split("/"))
    assert total == 10 and same >= 8  # both arrangements give each row its rung's text
    assert f["rider_tokens_per_round"] > 0  # the draft rung's rows did ride
    assert len(f["joules_ratio_per_round"]) == 2
    assert all(v > 0 for v in f["tokens_per_s"].values())
    text = report_mixed(f)
    assert "2 speculative rows" in text and "beside 3 rows of int8" in text
