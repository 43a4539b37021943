"""``GET /v1/requests/recent`` and the page's static files: every finished request is recorded
(native and OpenAI, streaming or not) with the cost the caller was told, the list is bounded,
and the page is served without a key, whole, and from this server only."""

from __future__ import annotations

import json
import re
import threading
import tomllib
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.recent import RecentRequests
from app.routes.ui import STATIC
from app.service import Call, Outcome
from models.runtime.engine.base import GenerationParams
from routing.policy import Budget, Decision
from telemetry.base import EnergyReading
from tests.app.test_api import assert_error

KEY = "recent-test-key-0123456789"
ROOT = Path(__file__).resolve().parents[2]


def recent(client: TestClient, **params: Any) -> dict[str, Any]:
    resp = client.get("/v1/requests/recent", params=params)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def sse_events(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def by_id(client: TestClient) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in recent(client)["data"]}


@pytest.fixture(scope="module")
def small(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(recent_requests=3, grid_gco2_per_kwh=400.0)


def test_each_endpoint_records_what_it_answered(client: TestClient) -> None:
    budget = {"latency_ms": 60_000.0, "min_quality": 1.0}
    native = client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 4,
                                               "budget": budget}).json()
    streamed = sse_events(client.post("/v1/generate", json={
        "prompt": "Hello", "max_new_tokens": 4, "stream": True, "variant": "distilled"}).text)
    done = streamed[-1]
    assert done["type"] == "done"
    completion = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()
    chat_chunks = sse_events(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
        "min_quality": 0.5}).text)
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).json()

    entries = by_id(client)
    n = entries[native["id"]]
    assert n["endpoint"] == "/v1/generate" and n["variant"] == native["variant"] == "full"
    assert n["energy"] == native["energy"] and n["route"] == native["route"]
    assert n["usage"] == native["usage"] and not n["pinned"]
    assert n["budget"] == {**budget, "max_joules": None}
    assert {c["why"] for c in n["route"]["candidates"] if c["variant"] != "full"} == {
        "quality_below_floor"}
    s = entries[done["id"]]
    assert s["pinned"] and s["variant"] == "distilled" and s["route"]["reason"] == "pinned"
    assert s["energy"]["joules"] == done["energy"]["joules"]
    c = entries[completion["id"].removeprefix("cmpl-")]
    assert c["endpoint"] == "/v1/completions"
    assert c["energy"]["joules"] == completion["usage"]["energy_joules"]
    last = chat_chunks[-1]
    cs = entries[last["id"].removeprefix("chatcmpl-")]
    assert cs["endpoint"] == "/v1/chat/completions" and cs["budget"]["min_quality"] == 0.5
    assert cs["energy"]["joules"] == last["usage"]["energy_joules"]
    assert cs["usage"]["completion_tokens"] == last["usage"]["completion_tokens"]
    ch = entries[chat["id"].removeprefix("chatcmpl-")]
    assert ch["energy"]["avg_watts"] == chat["usage"]["avg_watts"]
    # oldest first, in the order they finished; no prompt or answer text anywhere
    order = [e["id"] for e in recent(client)["data"]]
    ids = [native["id"], done["id"], completion["id"].removeprefix("cmpl-"),
           last["id"].removeprefix("chatcmpl-"), chat["id"].removeprefix("chatcmpl-")]
    assert order[-5:] == ids
    assert all("text" not in e and "prompt" not in e for e in recent(client)["data"])


def test_refused_requests_are_not_recorded(client: TestClient) -> None:
    before = len(recent(client)["data"])
    assert client.post("/v1/generate", json={"prompt": "Hi", "variant": "nope"}).status_code \
        == 404
    assert client.post("/v1/generate", json={"prompt": " "}).status_code == 422
    assert len(recent(client)["data"]) == before


def test_the_list_is_bounded_and_limit_takes_the_newest(small: TestClient) -> None:
    ids = [small.post("/v1/generate", json={"prompt": f"Hello {i}", "max_new_tokens": 2})
           .json()["id"] for i in range(5)]
    body = recent(small)
    assert body["size"] == 3
    assert [e["id"] for e in body["data"]] == ids[-3:]
    assert [e["id"] for e in recent(small, limit=2)["data"]] == ids[-2:]
    assert [e["id"] for e in recent(small, limit=10_000)["data"]] == ids[-3:]
    gco2e = body["data"][-1]["energy"]["gco2e"]  # the configured grid intensity applies
    joules = body["data"][-1]["energy"]["joules"]
    assert gco2e == pytest.approx(joules / 3.6e6 * 400.0)


@pytest.mark.parametrize("limit", ["0", "-1", "10001", "abc", "1.5", ""])
def test_a_bad_limit_is_a_422_envelope(client: TestClient, limit: str) -> None:
    assert_error(client.get("/v1/requests/recent", params={"limit": limit}), 422,
                 "invalid_request_error", "limit")


@pytest.mark.parametrize("query", ["limit=2&limit=3", "limit=00&limit=0&limit=&limit=%27x",
                                   "limit=abc&limit=5"])
def test_a_repeated_limit_is_a_422_envelope(client: TestClient, query: str) -> None:
    """Schemathesis found repeated, non-integer values answered 200: the last one won."""
    assert_error(client.get(f"/v1/requests/recent?{query}"), 422, "invalid_request_error",
                 "limit")


def test_ring_is_thread_safe_and_bounded() -> None:
    """Writers on many threads never push the ring past its bound, and it keeps each
    writer's entries in the order that writer added them."""
    ring = RecentRequests(50)
    reading = EnergyReading(joules=1.0, seconds=0.5, source="estimate", device="cpu",
                            estimated=True)
    route = Decision("full", "pinned", 1.0, 1.0, [])

    def add(worker: int) -> None:
        for i in range(500):
            call = Call("p", GenerationParams(max_new_tokens=1), Budget(1.0, 0.0), "/x", "full")
            ring.add(call, Outcome(f"{worker}-{i}", "full", "t", "length", 1, 1, reading, 1.0,
                                   0.0, route, call.budget))

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [tuple(map(int, e.id.split("-"))) for e in ring.latest()]
    assert len(ring) == 50 and len(set(kept)) == 50
    for worker in range(4):
        mine = [i for w, i in kept if w == worker]
        assert mine == sorted(mine)
    assert len(ring.latest(3)) == 3 and ring.latest(3) == ring.latest()[-3:]
    entry = ring.latest(1)[0]
    assert entry.pinned and entry.energy.avg_watts == 2.0 and entry.energy.joules_per_token == 1.0
    with pytest.raises(ValueError):
        RecentRequests(0)


def test_page_and_assets_need_no_key_and_the_api_does(
        make_client: Callable[..., TestClient]) -> None:
    keyed = make_client(api_keys=[KEY])
    assert_error(keyed.get("/v1/requests/recent"), 401, "authentication_error", None)
    ok = keyed.get("/v1/requests/recent", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"] == []
    page = keyed.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert keyed.head("/").status_code == 200
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assets = [r for r in refs if r.startswith("/static/")]
    assert "/static/app.js" in assets and "/static/vendor/uplot/uPlot.iife.min.js" in assets
    for ref in refs:  # nothing from another origin (no CDN)
        assert not re.match(r"^(https?:)?//", ref), ref
    for asset in assets:
        resp = keyed.get(asset)
        assert resp.status_code == 200, asset
        assert KEY not in resp.text
    assert KEY not in page.text
    assert keyed.get("/static/nope.js").status_code == 404


def test_every_static_file_is_package_data() -> None:
    """A wheel (and the image built from it) ships the page: each file under app/static
    matches a package-data pattern."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["app"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert "static/index.html" in files and "static/vendor/uplot/LICENSE" in files
    for f in files:
        assert any(fnmatch(f, pattern) for pattern in patterns), f
    version = (STATIC / "vendor/uplot/VERSION").read_text().strip()
    assert f"| {version} |" in (STATIC / "vendor/README.md").read_text()
