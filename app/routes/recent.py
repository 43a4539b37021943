"""``GET /v1/requests/recent``: the last finished requests' costs and routes (the web page's
chart reads it)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from app.deps import RecentDep, require_api_key
from app.http_errors import ApiError
from app.openapi import answers
from app.schemas import RecentList

router = APIRouter(dependencies=[Depends(require_api_key)])
RECENT_LIMIT = 10_000  # the most GREENROUTE_RECENT_REQUESTS allows


@router.get("/v1/requests/recent", response_model=RecentList,
            responses=answers(RecentList, 401, 422))
async def recent_requests(
        request: Request, recent: RecentDep,
        limit: Annotated[int | None, Query(ge=1, le=RECENT_LIMIT,
                                           description="newest entries to return "
                                                       "(default: all kept)")] = None) -> Any:
    """The newest finished requests (oldest first): variant, route, usage, budget and energy;
    at most GREENROUTE_RECENT_REQUESTS are kept in memory, and no prompt or text."""
    if len(request.query_params.getlist("limit")) > 1:  # which one would be a guess
        raise ApiError(422, "invalid_request_error", "limit may be given once", "limit")
    body = RecentList(size=recent.size, data=recent.latest(limit))
    return JSONResponse(body.model_dump(mode="json"))
