"""Operations: ``/health`` (alive), ``/ready`` (variants loaded), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from app.http_errors import envelope
from app.openapi import answers
from app.schemas import Health, Ready

router = APIRouter()
EXPOSITION = {"text/plain": {"schema": {"type": "string"}},
              "application/openmetrics-text": {"schema": {"type": "string"}}}


@router.get("/health", response_model=Health, responses=answers(Health, 503))
async def health(request: Request) -> Any:
    """The process is up (whether or not the ladder has loaded) and its device lane alive;
    503 once the lane has died (a liveness probe then restarts the process)."""
    service = getattr(request.app.state, "service", None)
    if service is not None and service.lane_failed is not None:
        return JSONResponse(envelope("lane_failed", str(service.lane_failed)), status_code=503)
    return Health()


@router.get("/ready", response_model=Ready, responses=answers(Ready, 503))
async def ready(request: Request) -> Any:
    """Every variant that can load has loaded; 503 (with the reason) until then."""
    state = request.app.state
    service = getattr(state, "service", None)
    if service is None:
        error = getattr(state, "load_error", None)
        message = f"not ready: {error}" if error else "not ready: the ladder is still loading"
        return JSONResponse(envelope("not_ready", message), status_code=503,
                            headers={"Retry-After": "2"})
    return Ready(variants=sorted(service.ladder.engines), failed=service.ladder.failed,
                 device=service.device)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition; OpenMetrics when "
                                            "`Accept` asks for application/openmetrics-text",
                             "content": EXPOSITION}})
async def metrics(request: Request) -> Response:
    """The service's metrics (names and labels: ARCHITECTURE.md, "Metrics")."""
    registry = request.app.state.registry
    service = getattr(request.app.state, "service", None)
    if service is not None:  # counters current at the scrape, not a period ago
        service.refresh_energy_metrics()
        service.refresh_memory_metrics()
        service.refresh_routing_metrics()
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(generate_openmetrics(registry), media_type=OPENMETRICS_CONTENT_TYPE)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
