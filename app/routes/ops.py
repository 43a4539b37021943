"""Operations: ``/health`` (alive), ``/ready`` (variants loaded), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from app.errors import envelope

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Any:
    state = request.app.state
    service = getattr(state, "service", None)
    if service is None:
        error = getattr(state, "load_error", None)
        message = f"not ready: {error}" if error else "not ready: the ladder is still loading"
        return JSONResponse(envelope("not_ready", message), status_code=503,
                            headers={"Retry-After": "2"})
    return {"status": "ready", "variants": sorted(service.ladder.engines),
            "failed": service.ladder.failed, "device": service.device}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.registry
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(generate_openmetrics(registry), media_type=OPENMETRICS_CONTENT_TYPE)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
