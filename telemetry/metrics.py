"""Every Prometheus metric of the contract, defined once, on a registry passed in.

Names, units and labels are frozen by dashboards: prefix ``greenroute_``, base units, labels
only from closed sets (variant names, device names, endpoint paths, status and reason enums).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from routing.policy import Reason

ENDPOINTS = ("/v1/generate", "/v1/completions", "/v1/chat/completions")
STATUSES = ("ok", "error", "rejected", "cancelled", "timeout")
# Buckets span what a request can take on a 2-core CPU and on a GPU, densest where the measured
# requests fall (the distributions they were chosen from: docs/routing-and-energy.md, Metrics).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENERGY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0, 500.0)
POWER_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 75.0, 150.0, 300.0, 700.0)
# Token timing buckets: likewise (time to first token includes the queue).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
                0.05, 0.1, 0.25)
# Route decision reasons, the router's own; a refused budget is counted as variant "none",
# reason "rejected".
ROUTE_REASONS: tuple[str, ...] = get_args(Reason)
REJECTED = ("none", "rejected")


class Metrics:
    """The service's metrics; label children for known values are created up front."""

    def __init__(self, registry: CollectorRegistry, variants: Iterable[str],
                 devices: Iterable[str]) -> None:
        p = "greenroute_"
        self.registry = registry
        self.requests = Counter(f"{p}requests", "Generation requests by outcome",
                                ["endpoint", "variant", "status"], registry=registry)
        self.duration = Histogram(f"{p}request_duration_seconds", "End-to-end request time",
                                  ["variant"], buckets=DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds",
                              "Request arrival to its first generated token (queue included)",
                              ["variant"], buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram(f"{p}time_per_output_token_seconds",
                              "Mean time per generated token after the first, per request",
                              ["variant"], buckets=TPOT_BUCKETS, registry=registry)
        self.energy = Histogram(f"{p}request_energy_joules", "Energy per request",
                                ["variant"], buckets=ENERGY_BUCKETS, registry=registry)
        self.power = Histogram(f"{p}request_power_watts", "Average power per request",
                               ["variant"], buckets=POWER_BUCKETS, registry=registry)
        self.energy_total = Counter(f"{p}energy_joules", "Energy spent on requests",
                                    ["variant"], registry=registry)
        self.phase_energy = Counter(f"{p}phase_energy_joules",
                                    "Energy spent on requests by phase: prefill (prompt "
                                    "tokens) or generation; the phases add up to "
                                    "energy_joules_total", ["variant", "phase"],
                                    registry=registry)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens processed",
                                     ["variant"], registry=registry)
        self.generated_tokens = Counter(f"{p}generated_tokens", "Tokens generated",
                                        ["variant"], registry=registry)
        self.device_power = Gauge(f"{p}device_power_watts", "Device power (recent average)",
                                  ["device", "source"], registry=registry)
        self.device_energy = Counter(f"{p}device_energy_joules",
                                     "All device energy, idle included",
                                     ["device", "source"], registry=registry)
        self.device_busy_energy = Counter(
            f"{p}device_busy_energy_joules",
            "Device energy while the lane was working: what the ledger splits among requests",
            ["device", "source"], registry=registry)
        self.route_decisions = Counter(f"{p}route_decisions", "Routing decisions",
                                       ["variant", "reason"], registry=registry)
        self.queue_depth = Gauge(f"{p}queue_depth", "Requests waiting per lane", ["device"],
                                 registry=registry)
        self.marginal_jpt = Gauge(
            f"{p}marginal_joules_per_token",
            "Joules per generated token one more request would add to this replica's device "
            "now (lifetime pricing, a 64-token prompt and 128 new tokens, the cheapest rung "
            "with a free row meeting min_quality): for endpoint pickers",
            ["min_quality"], registry=registry)
        self.batch_size = Gauge(f"{p}batch_size", "Rows in each variant's continuous batch",
                                ["variant"], registry=registry)
        self.spec_drafted = Counter(f"{p}spec_draft_tokens", "Tokens drafted for speculative "
                                    "verification", ["variant"], registry=registry)
        self.spec_accepted = Counter(f"{p}spec_accepted_tokens", "Drafted tokens the target "
                                     "model kept", ["variant"], registry=registry)
        self.inflight = Gauge(f"{p}inflight_requests", "Requests being served",
                              registry=registry)
        self.kv_capacity = Gauge(f"{p}kv_capacity_bytes", "KV cache memory each variant's rows "
                                 "may take, every row full (checked at start-up)", ["variant"],
                                 registry=registry)
        self.kv_written = Gauge(f"{p}kv_written_bytes", "KV cache memory each variant's rows "
                                "have written since start (resident: grows while rows reach new "
                                "lengths, bounded by kv_capacity_bytes)", ["variant"],
                                registry=registry)
        self.quality = Gauge(f"{p}variant_quality", "Measured quality (ppl_full / ppl_variant)",
                             ["variant"], registry=registry)
        variants = list(variants)
        for v in variants:
            for endpoint in ENDPOINTS:
                for status in STATUSES:
                    self.requests.labels(endpoint, v, status)
            for metric in (self.duration, self.ttft, self.tpot, self.energy, self.power,
                           self.energy_total, self.prompt_tokens, self.generated_tokens):
                metric.labels(v)
            self.batch_size.labels(v)
            for phase in ("prefill", "generation"):
                self.phase_energy.labels(v, phase)
            self.spec_drafted.labels(v)
            self.spec_accepted.labels(v)
            for reason in ROUTE_REASONS:
                self.route_decisions.labels(v, reason)
        self.route_decisions.labels(*REJECTED)
        for d in devices:
            self.queue_depth.labels(d)

    def speculated(self, variant: str, drafted: int, accepted: int) -> None:
        self.spec_drafted.labels(variant).inc(drafted)
        self.spec_accepted.labels(variant).inc(accepted)

    def meter_opened(self, device: str, source: str) -> None:
        """Create the device series for the meter in use, so they exist before a sample."""
        self.device_power.labels(device, source)
        self.device_energy.labels(device, source)
        self.device_busy_energy.labels(device, source)

    def device_sample(self, device: str, source: str, watts: float, joules: float) -> None:
        """One device-sampler reading: recent power, and the energy since the last one."""
        self.device_power.labels(device, source).set(watts)
        self.device_energy.labels(device, source).inc(joules)
