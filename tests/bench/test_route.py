"""bench route's report arithmetic (pure; the bench itself runs the service)."""

from __future__ import annotations

from bench.route import median_ratios


def _round(device: float, met: float) -> dict[str, float]:
    return {"device_joules": device, "budgets_met": met}


def test_ratios_are_medians_of_each_rounds_side_by_side_ratio() -> None:
    runs = {"routed @8": [_round(50, 0.9), _round(90, 0.8), _round(40, 1.0)],
            "always-full @8": [_round(100, 1.0), _round(100, 0.9), _round(50, 0.9)],
            "static @8": [_round(100, 0.7), _round(45, 0.8), _round(80, 0.9)]}
    lines = median_ratios(runs, [8])
    # per round: 0.5, 0.9, 0.8 -> 0.8 (the ratio of sums would be 180/250 = 0.72)
    assert "routed/always-full 0.80" in lines[1]
    assert "routed/static 0.50" in lines[1]  # 0.5, 2.0, 0.5
    assert "budgets met 90.0 / 90.0 / 80.0 %" in lines[1] and "(3 rounds)" in lines[1]
