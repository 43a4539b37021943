"""The build's heartbeat: a line whenever 30 s pass without one, saying what it is at."""

from __future__ import annotations

from models.build.pipeline.progress import Progress


def test_a_heartbeat_only_after_a_quiet_stretch_naming_the_last_step() -> None:
    lines: list[str] = []
    now = [1000.0]
    p = Progress(lines.append, every_s=30.0, clock=lambda: now[0])

    def at(t: float) -> bool:
        now[0] = 1000.0 + t
        return p.tick()

    p("  int8 candidate 3/8 rowquant-int8-a16: quantizing")
    assert not at(29.0)  # quiet for less than 30 s: nothing
    assert at(30.5)
    assert lines[-1] == ("  ... still at: int8 candidate 3/8 rowquant-int8-a16: quantizing "
                         "(30 s)")
    assert not at(45.0)  # the heartbeat counts as a line
    assert at(61.0) and lines[-1].endswith("(61 s)")  # the time at the step grows
    p("  int8: timing 8 candidates")
    assert not at(62.0) and len(lines) == 4


def test_the_heartbeat_thread_stops_with_the_build() -> None:
    lines: list[str] = []
    with Progress(lines.append, every_s=3600.0) as p:
        p("exporting")
        assert p._thread is not None and p._thread.is_alive()
    assert not p._thread.is_alive() and lines == ["exporting"]
