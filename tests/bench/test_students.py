"""bench students: the Pareto front, the report and the picture, the decode-rate timer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.students import decode_rate, pareto, report, svg
from models.runtime.engine.base import GenerationParams


def _figures() -> dict[str, Any]:
    def v(b1: float, b8: float, tasks: int, scored: str = "manifest") -> dict[str, Any]:
        return {"layers": None, "quality": 0.9, "agreement": 0.8, "tasks": tasks,
                "task_count": 60, "scored": scored, "tok_s_batch1": b1, "tok_s_batch8": b8,
                "speed_vs_full_batch1": b1 / 40, "speed_vs_full_batch8": b8 / 200}
    return {"rounds": 3, "tokens": 16, "threads": 2, "variants": {
        "full": v(40, 200, 38), "int8": v(100, 300, 35),
        "depth-20": v(60, 280, 20, "here"), "depth-16": v(120, 320, 5, "here")}}


def test_front_keeps_only_what_nothing_beats_on_both_axes() -> None:
    pts = {"a": (1.0, 10.0), "b": (2.0, 9.0), "c": (1.5, 8.0), "d": (2.0, 9.0)}
    assert sorted(pareto(pts)) == ["a", "b", "d"]  # c: b is faster and better; b, d tie
    f = _figures()
    front = pareto({n: (v["tok_s_batch1"], v["tasks"]) for n, v in f["variants"].items()})
    assert sorted(front) == ["depth-16", "full", "int8"]  # depth-20: int8 beats it on both


def test_report_and_picture_show_every_variant_and_mark_the_front() -> None:
    f = _figures()
    text = report(f)
    assert "int8 *" in text and "depth-20 *" not in text and "depth-20" in text
    assert " 20/60" in text and "1.50" in text  # depth-20's tasks; 60 / 40 tok/s
    picture = svg(f)
    assert picture.count("<circle") == 2 * len(f["variants"])  # two panels
    assert picture.count('fill="#c33"') == 4  # the two candidates, twice


def test_decode_rate_times_every_row_and_frees_its_slots(tiny_ladder: Path) -> None:
    from models.runtime.ladder import load_ladder

    engine = load_ladder(tiny_ladder, only=["full"], warmup=False).engines["full"]
    prompt = engine.encode("the quick brown fox")
    one, kind = decode_rate(engine, prompt, 1, 8)
    eight, _ = decode_rate(engine, prompt, 8, 8)
    assert one > 0 and eight > 0 and kind == "shared-kv-batch"
    again = engine.generate(prompt, GenerationParams(max_new_tokens=4))  # still serves
    assert len(again.token_ids) >= 1


def test_without_training_candidates_the_rungs_alone_are_timed(tiny_ladder: Path,
                                                               tmp_path: Path) -> None:
    """``--work`` pointing at a directory with no ``candidates/`` (no training run here):
    every rung of the ladder is timed and reported, nothing else."""
    from bench.students import run_bench
    from models.runtime.manifest import Manifest

    lines: list[str] = []
    f = run_bench(tiny_ladder, tmp_path, tmp_path / "no-teacher", tmp_path / "out", rounds=1,
                  tokens=4, log=lines.append)
    rungs = {"full", "int8", "int4", "distilled", "distilled-int8"}
    assert set(f["variants"]) == rungs & set(Manifest.load(tiny_ladder).variants)
    assert {"full", "distilled"} <= set(f["variants"])
    assert f["variants"]["full"]["speed_vs_full_batch1"] == 1.0
    assert all(v["tok_s_batch1"] > 0 and v["scored"] == "manifest"
               for v in f["variants"].values())
    assert any("rungs only" in line for line in lines)


def test_labels_of_points_at_one_place_do_not_overlap() -> None:
    """The same weights built twice (the shipped student and its candidate) land on one point:
    their labels go on separate lines."""
    import re

    f = _figures()
    f["variants"]["twin"] = dict(f["variants"]["depth-20"])
    picture = svg(f)
    ys = {name: [float(y) for y in re.findall(rf'<text x="[\d.]+" y="([\d.]+)">{name}</text>',
                                             picture)] for name in ("depth-20", "twin")}
    assert len(ys["depth-20"]) == len(ys["twin"]) == 2  # one label per panel
    for a, b in zip(ys["depth-20"], ys["twin"], strict=True):
        assert abs(a - b) >= 13
