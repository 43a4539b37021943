"""The web page at ``/``: try a prompt under a budget, see which variant served it and what it
cost. Static files shipped in the package (``app/static``), no build step and no CDN; the page
and its assets carry no secret and are served without an API key (the page asks for a key and
sends it to the ``/v1`` routes when the server wants one)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)
# the page only talks to its own origin; nothing inline, nothing from elsewhere
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    """The page itself."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers=SECURITY_HEADERS)


def mount(app: FastAPI) -> None:
    """``/`` and its assets under ``/static`` (outside the OpenAPI document)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=True), name="static")
