"""Carbon accounting: grams of CO2-equivalent for a number of joules at a grid intensity."""

from __future__ import annotations

JOULES_PER_KWH = 3.6e6


def grams_co2e(joules: float, grid_g_per_kwh: float | None) -> float | None:
    """``joules`` at ``grid_g_per_kwh`` (gCO2e per kWh); ``None`` when no intensity is set."""
    if grid_g_per_kwh is None:
        return None
    return joules / JOULES_PER_KWH * grid_g_per_kwh
