"""What the app records of the lane's reports: per-request cost metrics, the power window the
power cap reads, the per-request log line, batch sizes, queue depth and speculation counters."""

from __future__ import annotations

import logging

from serving.events import Finished
from serving.job import Job
from serving.observer import LaneObserver
from telemetry.metrics import Metrics

log = logging.getLogger("greenroute.requests")


class ServiceObserver(LaneObserver):
    """Called in the lane thread (see :class:`serving.observer.LaneObserver`)."""

    def __init__(self, metrics: Metrics, device: str) -> None:
        self.metrics = metrics
        self.device = device

    def request_finished(self, request: Job, f: Finished) -> None:
        """Recorded when a request ends, even when its caller has gone away or the engine
        failed. The request id rides on the histograms as an exemplar (never as a label)."""
        m = self.metrics
        variant, reading = request.variant, f.energy
        exemplar = {"request_id": request.id}
        if f.steps:
            m.ttft.labels(variant).observe(f.first_token - request.arrived, exemplar)
        if f.steps > 1:
            m.tpot.labels(variant).observe((f.last_token - f.first_token) / (f.steps - 1),
                                           exemplar)
        m.energy.labels(variant).observe(reading.joules, exemplar)
        m.power.labels(variant).observe(reading.avg_watts, exemplar)
        m.energy_total.labels(variant).inc(reading.joules)
        m.phase_energy.labels(variant, "prefill").inc(reading.prefill_joules or 0.0)
        m.phase_energy.labels(variant, "generation").inc(max(0.0, reading.generation_joules))
        m.prompt_tokens.labels(variant).inc(f.prompt_tokens)
        m.generated_tokens.labels(variant).inc(f.completion_tokens)
        log.info("request %s variant=%s prompt_tokens=%d generated=%d finish=%s joules=%.4f "
                 "watts=%.2f seconds=%.3f source=%s device=%s%s", request.id, variant,
                 f.prompt_tokens, f.completion_tokens, f.finish_reason, reading.joules,
                 reading.avg_watts, reading.seconds, reading.source, reading.device,
                 f" ({reading.note})" if reading.note else "")

    def batch_size(self, variant: str, rows: int) -> None:
        self.metrics.batch_size.labels(variant).set(rows)

    def queue_depth(self, waiting: int) -> None:
        self.metrics.queue_depth.labels(self.device).set(waiting)

    def speculated(self, variant: str, drafted: int, accepted: int) -> None:
        self.metrics.speculated(variant, drafted, accepted)
