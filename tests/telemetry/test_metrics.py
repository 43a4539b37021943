"""The metrics module: every label child of a known variant exists from start-up (a dashboard
sees zeros, not gaps), and the token-timing histograms have the contract's names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from telemetry.metrics import ENDPOINTS, REJECTED, ROUTE_REASONS, STATUSES, Metrics

VARIANTS = ("full", "int8", "distilled")


def test_every_child_exists_before_any_request() -> None:
    registry = CollectorRegistry()
    Metrics(registry, VARIANTS, ["cpu"])

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    for v in VARIANTS:
        for name in ("greenroute_time_to_first_token_seconds",
                     "greenroute_time_per_output_token_seconds",
                     "greenroute_request_duration_seconds", "greenroute_request_energy_joules",
                     "greenroute_request_power_watts"):
            assert value(f"{name}_count", variant=v) == 0, (name, v)
            assert value(f"{name}_bucket", variant=v, le="+Inf") == 0, (name, v)
        for reason in ROUTE_REASONS:
            assert value("greenroute_route_decisions_total", variant=v, reason=reason) == 0
        for endpoint in ENDPOINTS:
            for status in STATUSES:
                assert value("greenroute_requests_total", endpoint=endpoint, variant=v,
                             status=status) == 0
    none, rejected = REJECTED
    assert value("greenroute_route_decisions_total", variant=none, reason=rejected) == 0
    assert value("greenroute_queue_depth", device="cpu") == 0


def test_token_timing_buckets_resolve_the_measured_range() -> None:
    """Per-token times of 3-8 ms and ~20 ms, and first tokens at tens to hundreds of ms, land
    in different buckets (a histogram_quantile over them can tell the variants apart)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, VARIANTS, ["cpu"])
    for seconds in (0.003, 0.008, 0.02):
        metrics.tpot.labels("full").observe(seconds)
    for seconds in (0.03, 0.08, 0.3):
        metrics.ttft.labels("full").observe(seconds)

    def filled(name: str) -> list[float]:
        """The upper bounds of the buckets whose count rose (one per observation here)."""
        out, previous = [], 0.0
        for sample in registry.collect():
            for s in sample.samples:
                if s.name == f"{name}_bucket" and s.labels["variant"] == "full":
                    if s.value > previous:
                        out.append(float(s.labels["le"]))
                    previous = s.value
        return out

    assert len(filled("greenroute_time_per_output_token_seconds")) == 3
    assert len(filled("greenroute_time_to_first_token_seconds")) == 3
