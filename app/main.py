"""The FastAPI app: built by :func:`create_app`, loaded by its lifespan, state on ``app.state``.

The ladder loads in a worker thread after start-up so ``/health`` answers at once and
``/ready`` says 503 until every variant that can load has loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.http_errors import install_error_handlers
from app.middleware import BodyLimitMiddleware
from app.openapi import document
from app.recent import RecentRequests
from app.routes import native, openai, ops, recent, ui
from app.service import GenerationService
from app.settings import Settings
from app.startup import build_service, redact_paths

log = logging.getLogger("greenroute")


LANE_WATCH_S = 1.0  # how often the app looks at its lane


async def watch_lane(service: GenerationService) -> None:
    """When the device lane dies, end the process (a graceful SIGTERM: uvicorn drains and
    exits) so that its supervisor starts a fresh one: compose's ``restart: unless-stopped``,
    Kubernetes' restart policy. /health already answers 503 by then."""
    executor = service.executor
    while executor.alive:
        await asyncio.sleep(LANE_WATCH_S)
    if executor.failed is not None:
        log.critical("the %s lane died (%s): stopping the process for a restart",
                     executor.device, executor.failed.cause)
        os.kill(os.getpid(), signal.SIGTERM)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    state.recent = RecentRequests(state.settings.recent_requests)

    async def load() -> None:
        try:
            state.service = await asyncio.to_thread(build_service, state.settings,
                                                    state.registry)
        except Exception as err:  # reported by /ready; the process stays up to say so
            first = str(err).splitlines()[0]
            log.error("ladder failed to load: %s", first)  # the whole reason, for operators
            state.load_error = redact_paths(first)  # /ready is public: no file-system layout
            return
        if state.settings.exit_on_lane_failure:
            await watch_lane(state.service)

    loader = asyncio.create_task(load())
    try:
        yield
    finally:
        loader.cancel()
        service: GenerationService | None = getattr(state, "service", None)
        if service is not None:
            grace = state.settings.shutdown_grace_s
            await asyncio.to_thread(service.executor.stop, grace)
            service.ladder.close()
            if service.sampler is not None:
                service.sampler.stop()
            service.meter.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app (own settings and metrics registry); nothing is shared between apps."""
    settings = settings or Settings()
    app = FastAPI(title="greenroute", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    install_error_handlers(app)
    app.openapi = lambda: document(app, settings)  # type: ignore[method-assign]
    app.include_router(ops.router)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(recent.router)
    ui.mount(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    return app
