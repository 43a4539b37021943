"""An engine that fails mid-generation: every stream still ends properly (an error event in its
own format; ``data: [DONE]`` for OpenAI), the request counts as ``error``, its tokens and
energy are accounted, and nothing about the failure leaks to the caller."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.runtime.engine.base import GenerationParams
from models.runtime.engine.slots import Sampler, Slots
from tests.app.test_api import assert_error

FAIL_AFTER = 5  # tokens produced before the engine fails
SECRET = "device lost at 0xdeadbeef"  # the engine's own message: must not reach the caller
PROMPT = "The json module"


class FailingSlots(Slots):
    """A real variant's rows that fail in the runtime once a row has produced ``fail_after``
    tokens (EOS ignored)."""

    def __init__(self, inner: Slots, fail_after: int) -> None:
        super().__init__(inner.engine, inner.max_batch, inner.max_len)
        self.inner, self.fail_after = inner, fail_after
        self.batched, self.kind = inner.batched, inner.kind
        self.produced: dict[int, int] = {}

    def prefill(self, row: int, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        self.produced[row] = 1
        return self.inner.prefill(row, prompt_ids, sampler)

    def step(self, rows: Sequence[int], tokens: Sequence[int],
             samplers: Sequence[Sampler]) -> list[int]:
        if any(self.produced[r] >= self.fail_after for r in rows):
            raise RuntimeError(SECRET)
        for r in rows:
            self.produced[r] += 1
        return self.inner.step(rows, tokens, samplers)

    def release(self, row: int) -> None:
        self.produced.pop(row, None)
        self.inner.release(row)


@pytest.fixture(scope="module")
def failing(make_client: Callable[..., TestClient]) -> TestClient:
    """The real app with int8's rows replaced by a failing copy of themselves; others intact."""
    client = make_client(variants="int8,distilled,full")
    batches = client.app.state.service.executor.lane.batches  # type: ignore[attr-defined]
    batches["int8"].slots = FailingSlots(batches["int8"].slots, FAIL_AFTER)
    return client


def metric(client: TestClient, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{want}}} not exposed")


def errors(client: TestClient, endpoint: str) -> float:
    return metric(client, "greenroute_requests_total", endpoint=endpoint, status="error",
                  variant="int8")


def data_lines(client: TestClient, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def assert_internal(err: dict[str, Any]) -> None:
    assert err["type"] == err["code"] == "internal_error"
    assert "see the server log" in err["message"] and SECRET not in err["message"]


def test_the_fake_fails_where_the_real_engine_goes_on(failing: TestClient) -> None:
    engine = failing.app.state.service.ladder.engines["int8"]  # type: ignore[attr-defined]
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    chunks = list(engine.stream(engine.encode(PROMPT), params))
    assert len(chunks) == 20  # the real engine would have produced them all
    # every token before the failure has text, so each one is a stream event
    assert all(c.text for c in chunks[:FAIL_AFTER])
    slots = failing.app.state.service.executor.lane.batches["int8"].slots  # type: ignore[attr-defined]
    sampler = Sampler(params)
    last = [slots.prefill(0, engine.encode(PROMPT), sampler)]
    with pytest.raises(RuntimeError, match="device lost"):
        for _ in range(19):
            last = slots.step([0], last, [sampler])
    slots.release(0)


def test_native_stream_ends_with_an_error_event(failing: TestClient) -> None:
    before = errors(failing, "/v1/generate")
    tokens_before = metric(failing, "greenroute_generated_tokens_total", variant="int8")
    events = [json.loads(x) for x in data_lines(failing, "/v1/generate", {
        "prompt": PROMPT, "max_new_tokens": 20, "variant": "int8", "stream": True})]
    *tokens, last = events
    # all the tokens made before the failure arrive (none is dropped), then the error
    assert [e["type"] for e in tokens] == ["token"] * FAIL_AFTER
    assert [e["index"] for e in tokens] == list(range(FAIL_AFTER))
    assert last["type"] == "error" and "done" not in [e["type"] for e in events]
    assert_internal(last["error"])
    assert errors(failing, "/v1/generate") == before + 1
    assert metric(failing, "greenroute_generated_tokens_total",
                  variant="int8") == tokens_before + FAIL_AFTER


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
])
def test_openai_stream_ends_with_an_error_then_done(failing: TestClient, path: str,
                                                    body: dict[str, Any]) -> None:
    before = errors(failing, path)
    lines = data_lines(failing, path, {**body, "model": "int8", "max_tokens": 20,
                                       "stream": True, "temperature": 0})
    assert lines[-1] == "[DONE]"
    *chunks, error = [json.loads(x) for x in lines[:-1]]
    assert chunks and all("choices" in c and c["choices"][0]["finish_reason"] is None
                          for c in chunks)  # no chunk claims the answer finished
    assert set(error) == {"error"}
    assert_internal(error["error"])
    assert errors(failing, path) == before + 1


def test_non_streaming_failure_is_a_500_envelope(failing: TestClient) -> None:
    before = errors(failing, "/v1/generate")
    resp = failing.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 20,
                                              "variant": "int8"})
    assert_internal(assert_error(resp, 500, "internal_error"))
    assert errors(failing, "/v1/generate") == before + 1


def test_other_variants_still_serve_after_a_failure(failing: TestClient) -> None:
    data_lines(failing, "/v1/generate", {"prompt": PROMPT, "variant": "int8", "stream": True})
    resp = failing.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 3,
                                              "variant": "distilled"})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
