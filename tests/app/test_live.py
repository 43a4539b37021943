"""A real uvicorn process on loopback: the official openai client, 429s under load,
client disconnects, graceful shutdown."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from tests.app.conftest import LiveServer


def test_openai_client_unchanged(live_server: Callable[..., LiveServer]) -> None:
    server = live_server()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="auto", prompt="The json module", max_tokens=6,
                                     temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens <= 6
    assert (done.usage.model_extra or {})["energy_joules"] > 0
    chat = client.chat.completions.create(
        model="distilled", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
        extra_body={"latency_budget_ms": 2000, "min_quality": 0.1})
    assert chat.model == "distilled" and chat.choices[0].message.role == "assistant"

    chunks = list(client.chat.completions.create(
        model="int8", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and (usage.model_extra or {})["energy_joules"] > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed = list(client.completions.create(model="int8", prompt="Hello", max_tokens=8,
                                              stream=True, temperature=0))
    assert "".join(c.choices[0].text for c in streamed)
    assert isinstance(text, str)
    models = [m.id for m in client.models.list()]
    assert models[0] == "auto" and "full" in models

    try:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    except openai.NotFoundError as err:
        assert "unknown variant" in str(err)
    else:  # pragma: no cover - the assertion below explains
        raise AssertionError("unknown model must be a 404")


def test_full_queue_gets_429_while_accepted_requests_complete(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server(queue_size="1", max_batch="2")  # 2 rows + 1 waiting: 3 of 8 fit
    body = {"prompt": "The", "max_new_tokens": 100, "variant": "full", "stop": []}

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/v1/generate", json=body)

    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] >= 1
    rejected = server.metric("greenroute_requests_total", endpoint="/v1/generate",
                             variant="full", status="rejected")
    assert rejected == codes.count(429)


def _disconnects_cancel(server: LiveServer, disconnect: Callable[[], None]) -> bool:
    """Run ``disconnect`` (a request the client abandons); True when the server counted it
    cancelled and stopped decoding early. A tiny model on a fast host can finish all 500 tokens
    before the disconnect is seen; then nothing was left to cancel and this returns False, so a
    caller retries; if cancellation never works, every try returns False."""
    def metric(name: str, **labels: str) -> float:
        return server.metric(name, variant="full", **labels)

    cancelled0 = metric("greenroute_requests_total", endpoint="/v1/generate", status="cancelled")
    ok0 = metric("greenroute_requests_total", endpoint="/v1/generate", status="ok")
    generated0 = metric("greenroute_generated_tokens_total")
    disconnect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = metric("greenroute_requests_total", endpoint="/v1/generate",
                           status="cancelled") - cancelled0
        finished = metric("greenroute_requests_total", endpoint="/v1/generate",
                          status="ok") - ok0
        if cancelled:
            time.sleep(0.2)  # let the lane record the tokens it did produce
            # all 500 made: the lane outran the disconnect (nothing left to stop); try again
            return metric("greenroute_generated_tokens_total") - generated0 < 500
        if finished:
            return False
        time.sleep(0.05)
    raise AssertionError("the abandoned request was counted neither cancelled nor ok:\n"
                         + server.output()[-3000:])


def test_disconnect_stops_generation(live_server: Callable[..., LiveServer]) -> None:
    server = live_server()
    body = {"prompt": "The", "max_new_tokens": 500, "variant": "full", "stream": True,
            "stop": []}

    def read_three_tokens_then_leave() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c, \
                c.stream("POST", "/v1/generate", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert all(json.loads(x[6:])["type"] == "token" for x in got
                       if x.startswith("data"))

    assert any(_disconnects_cancel(server, read_three_tokens_then_leave) for _ in range(5))


def test_non_streaming_disconnect_stops_generation(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server()
    body = {"prompt": "The", "max_new_tokens": 500, "variant": "full", "stop": []}

    def give_up() -> None:  # the client times out and closes the connection
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/generate", json=body, timeout=0.03)

    assert any(_disconnects_cancel(server, give_up) for _ in range(5))


def test_sigterm_finishes_in_flight_requests_then_exits_0(
    live_server: Callable[..., LiveServer],
) -> None:
    server = live_server()
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        result["r"] = httpx.post(f"{server.url}/v1/generate", timeout=60, json={
            "prompt": "The", "max_new_tokens": 500, "variant": "full", "stop": []})

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while server.metric("greenroute_inflight_requests") < 1:  # wait until it is in flight
        assert time.monotonic() < deadline, "the request never started"
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].status_code == 200
    assert result["r"].json()["finish_reason"] in ("length", "stop")  # ran to its end
    assert server.proc.wait(30) == 0


def test_a_dead_lane_ends_the_process_for_its_supervisor_to_restart(
        live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    """The hardware boundary fails under a running service (its RAPL counter turns
    unreadable): the request in flight gets 503 ``lane_failed``, and the process stops itself
    cleanly (exit 0 after draining) so that compose or Kubernetes starts a fresh one."""
    from tests.telemetry.fakes import make_powercap

    root = make_powercap(tmp_path / "powercap", {0: 1_000_000})
    server = live_server(energy_meter="rapl", rapl_root=str(root))
    assert server.http.get("/health").status_code == 200
    (root / "intel-rapl:0" / "energy_uj").write_text("not a number\n")
    resp = server.http.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 4})
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "lane_failed"
    assert server.proc.wait(60) == 0
    assert "lane died" in server.output()
