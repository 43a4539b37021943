"""Dependency aliases: typed access to what the lifespan put on ``app.state``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.http_errors import ApiError
from app.recent import RecentRequests
from app.service import GenerationService
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> GenerationService:
    service: GenerationService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiError(503, "not_ready", "the model ladder is still loading; retry shortly",
                       headers={"Retry-After": "2"})
    return service


def get_recent(request: Request) -> RecentRequests:
    recent: RecentRequests = request.app.state.recent
    return recent


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
RecentDep = Annotated[RecentRequests, Depends(get_recent)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With ``GREENROUTE_API_KEYS`` set, ``Authorization: Bearer <key>`` must match one."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "authentication_error", "missing API key: send "
                       "'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in settings.api_keys):
        raise ApiError(401, "authentication_error", "invalid API key",
                       headers={"WWW-Authenticate": "Bearer"})
