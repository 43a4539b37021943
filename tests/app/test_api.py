"""Endpoints against the real app and real tiny-model sessions (in process)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from models.runtime.manifest import Manifest
from tests.app.conftest import wait_ready_says

VARIANTS = {"full", "int8", "distilled", "distilled-int8"}  # always built; int4 when it earns it


@pytest.fixture(scope="module")
def ladder_variants(tiny_ladder: Path) -> set[str]:
    """The variants this build of the tiny ladder has (int4 depends on a measurement)."""
    names = set(Manifest.load(tiny_ladder).variants)
    assert VARIANTS <= names <= VARIANTS | {"int4"}
    return names


def assert_error(resp: Any, status: int, type_: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"type", "message", "param"}
    assert err["message"]
    if type_ is not None:
        assert err["type"] == type_
    if param is not None:
        assert err["param"] == param
    return dict(err)


def test_generate_reports_text_usage_energy_and_route(client: TestClient,
                                                     ladder_variants: set[str]) -> None:
    resp = client.post("/v1/generate", json={"prompt": "The json module", "max_new_tokens": 6,
                                             "stop": []})
    assert resp.status_code == 200
    body = resp.json()
    assert body["variant"] in ladder_variants and body["route"]["variant"] == body["variant"]
    assert body["route"]["reason"] in ("cheapest_feasible", "best_effort")
    candidates = {c["variant"] for c in body["route"]["candidates"]}
    assert body["route"]["predicted_joules"] > 0 and candidates == ladder_variants
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["prompt_tokens"] > 0
    energy = body["energy"]
    assert energy["source"] == "estimate" and energy["estimated"] is True
    assert energy["joules"] > 0 and energy["avg_watts"] > 0
    assert resp.headers["x-greenroute-variant"] == body["variant"]
    assert float(resp.headers["x-greenroute-energy-joules"]) == pytest.approx(energy["joules"],
                                                                             abs=1e-6)
    assert body["latency_ms"] >= body["queue_ms"] >= 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pinned_variant_serves_the_request(client: TestClient, variant: str) -> None:
    resp = client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 3,
                                             "variant": variant})
    assert resp.status_code == 200
    assert resp.json()["variant"] == variant and resp.json()["route"]["reason"] == "pinned"


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(client: TestClient) -> None:
    # Reproducibility holds per variant: with "auto" the router may (rightly) move the same
    # request to another variant as its learned costs change, so the variant is pinned here.
    def text(**extra: Any) -> str:
        body = {"prompt": "Return the", "max_new_tokens": 12, "variant": "full", **extra}
        answer = client.post("/v1/generate", json=body).json()
        assert answer["variant"] == "full"
        return str(answer["text"])

    assert text() == text()
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 42}
    assert text(**sampled) == text(**sampled)
    assert text(**sampled) != text(temperature=1.0, top_p=0.9, seed=43)


def test_native_stream_sends_tokens_then_done(client: TestClient) -> None:
    with client.stream("POST", "/v1/generate", json={"prompt": "The json module",
                                                     "max_new_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    tokens = [e for e in events if e["type"] == "token"]
    done = events[-1]
    assert done["type"] == "done" and len(tokens) >= 1
    assert "".join(e["text"] for e in tokens) == done["text"]
    assert done["usage"]["completion_tokens"] <= 8 and done["energy"]["joules"] > 0


BAD_INPUTS: list[tuple[str, Any, int, str | None]] = [
    ("missing prompt", {}, 422, "prompt"),
    ("non-string prompt", {"prompt": 5}, 422, "prompt"),
    ("empty prompt", {"prompt": ""}, 422, "prompt"),
    ("blank prompt", {"prompt": "   "}, 422, "prompt"),
    ("prompt over char limit", {"prompt": "x" * 2001}, 422, "prompt"),
    ("zero max_new_tokens", {"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("max_new_tokens over limit", {"prompt": "x", "max_new_tokens": 501}, 422,
     "max_new_tokens"),
    ("negative temperature", {"prompt": "x", "temperature": -0.1}, 422, "temperature"),
    ("temperature too high", {"prompt": "x", "temperature": 2.5}, 422, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("top_p over one", {"prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ("min_quality over one", {"prompt": "x", "budget": {"min_quality": 1.5}}, 422,
     "budget.min_quality"),
    ("negative min_quality", {"prompt": "x", "budget": {"min_quality": -0.1}}, 422,
     "budget.min_quality"),
    ("zero latency budget", {"prompt": "x", "budget": {"latency_ms": 0}}, 422,
     "budget.latency_ms"),
    ("negative latency budget", {"prompt": "x", "budget": {"latency_ms": -5}}, 422,
     "budget.latency_ms"),
    ("unknown field", {"prompt": "x", "temprature": 1}, 422, "temprature"),
    ("too many stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("empty stop", {"prompt": "x", "stop": [""]}, 422, "stop"),
    ("unknown variant", {"prompt": "x", "variant": "huge"}, 404, "variant"),
    # strict types: nothing is coerced
    ("bool for a number", {"prompt": "x", "budget": {"min_quality": False}}, 422,
     "budget.min_quality"),
    ("numeric string for a number", {"prompt": "x", "temperature": "0.5"}, 422, "temperature"),
    ("number for a bool", {"prompt": "x", "stream": 1}, 422, "stream"),
    ("fractional integer", {"prompt": "x", "max_new_tokens": 2.5}, 422, "max_new_tokens"),
    ("bool for an integer", {"prompt": "x", "max_new_tokens": True}, 422, "max_new_tokens"),
    ("seed of 2**63", {"prompt": "x", "seed": 2**63}, 422, "seed"),
    ("number for stop", {"prompt": "x", "stop": 5}, 422, "stop"),
    ("context overflow", {"prompt": "word " * 300, "max_new_tokens": 400}, 422,
     "max_new_tokens"),
]


@pytest.fixture(scope="module")
def strict(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(max_prompt_chars=2000, max_new_tokens_limit=500, max_body_bytes=4096)


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(strict: TestClient, name: str, body: Any, status: int,
                                    param: str | None) -> None:
    assert_error(strict.post("/v1/generate", json=body), status, param=param)


def test_integral_floats_are_integers_and_a_stop_may_be_one_string(strict: TestClient) -> None:
    """JSON Schema's ``integer`` includes 3.0; OpenAI's ``stop`` may be one string or null."""
    for stop in ("\n\n", None, ["\n\n"]):
        resp = strict.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 3.0,
                                                 "seed": 7.0, "stop": stop})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] <= 3


def test_context_overflow_names_the_limit(strict: TestClient) -> None:
    err = assert_error(strict.post("/v1/generate", json={"prompt": "word " * 300,
                                                         "max_new_tokens": 400}), 422,
                       "context_length_exceeded")
    assert "exceeds the model's context of 512 tokens" in err["message"]


def test_malformed_json_is_400(strict: TestClient) -> None:
    resp = strict.post("/v1/generate", content=b'{"prompt": "x",',
                       headers={"content-type": "application/json"})
    assert_error(resp, 400, "invalid_json")


def test_oversized_body_is_413_declared_or_streamed(strict: TestClient) -> None:
    assert_error(strict.post("/v1/generate", json={"prompt": "x" * 5000}), 413,
                 "payload_too_large")

    def chunks() -> Any:  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    resp = strict.post("/v1/generate", content=chunks(),
                       headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large")


def test_service_still_works_after_bad_input(strict: TestClient) -> None:
    for body, _, _, _ in [(c[1], 0, 0, 0) for c in BAD_INPUTS]:
        strict.post("/v1/generate", json=body)
    assert strict.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 2}
                       ).status_code == 200


def test_openai_completion_and_chat_shapes(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"model": "int8", "prompt": "The json",
                                                "max_tokens": 5, "temperature": 0})
    body = resp.json()
    assert resp.status_code == 200 and body["object"] == "text_completion"
    assert body["model"] == "int8" and body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["energy_joules"] > 0 and usage["energy_source"] == "estimate"
    resp = client.post("/v1/chat/completions", json={
        "model": "auto", "max_tokens": 4, "latency_budget_ms": 5000, "min_quality": 0.5,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "What is json?"}]})
    body = resp.json()
    assert resp.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "User:" not in body["choices"][0]["message"]["content"]


def test_openai_errors_name_openai_fields(client: TestClient) -> None:
    assert_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404,
                 "model_not_found", "model")
    assert_error(client.post("/v1/completions", json={"prompt": "x", "n": 2}), 422, param="n")
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 422,
                 param="messages")
    assert_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "robot", "content": "x"}]}), 422)
    assert_error(client.post("/v1/completions", json={"prompt": "x", "min_quality": 2}), 422,
                 param="min_quality")


def test_models_and_variants_list_the_ladder(client: TestClient,
                                            ladder_variants: set[str]) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]][0] == "auto"
    assert {m["id"] for m in models["data"]} == {"auto"} | ladder_variants
    variants = {v["name"]: v for v in client.get("/v1/variants").json()["data"]}
    assert set(variants) == ladder_variants
    assert variants["full"]["quality"] == 1.0 and all(v["loaded"] for v in variants.values())


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics exposition (labels in any order)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"{name}{labels} not exposed")


def test_metrics_count_requests_and_energy(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    text = c.get("/metrics").text  # children exist before any request
    for name in ("greenroute_time_to_first_token_seconds_count",
                 "greenroute_time_per_output_token_seconds_count"):
        assert sample(text, name, variant="int8") == 0
    assert sample(text, "greenroute_kv_written_bytes", variant="int8") == 0
    capacity = sample(text, "greenroute_kv_capacity_bytes", variant="int8")
    assert capacity > 0
    assert sample(text, "greenroute_route_decisions_total", variant="int8", reason="pinned") == 0
    assert sample(text, "greenroute_route_decisions_total", variant="none",
                  reason="rejected") == 0
    c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 3, "variant": "int8"})
    c.post("/v1/generate", json={"prompt": "x", "variant": "nope"})
    text = c.get("/metrics").text
    assert sample(text, "greenroute_route_decisions_total", variant="int8", reason="pinned") == 1
    # the request's prompt and its tokens were written to a row, and stay resident
    assert 0 < sample(text, "greenroute_kv_written_bytes", variant="int8") < capacity
    for name in ("greenroute_time_to_first_token_seconds",
                 "greenroute_time_per_output_token_seconds"):
        assert sample(text, f"{name}_count", variant="int8") == 1
        assert sample(text, f"{name}_sum", variant="int8") > 0
        assert sample(text, f"{name}_count", variant="full") == 0
    # the first token comes before the end of its request
    assert (sample(text, "greenroute_time_to_first_token_seconds_sum", variant="int8")
            < sample(text, "greenroute_request_duration_seconds_sum", variant="int8"))
    ok = 'greenroute_requests_total{endpoint="/v1/generate",status="ok",variant="int8"} 1.0'
    assert ok in text
    assert 'greenroute_variant_quality{variant="full"} 1.0' in text
    line = next(x for x in text.splitlines()
                if x.startswith('greenroute_energy_joules_total{variant="int8"}'))
    assert float(line.split()[-1]) > 0
    assert 'greenroute_generated_tokens_total{variant="int8"} 3.0' in text


def test_api_keys_guard_generation_not_operations(make_client: Callable[..., TestClient]) -> None:
    key = "k" * 20
    c = make_client(api_keys=[key, "other-key-0123456789"])
    body = {"prompt": "x", "max_new_tokens": 2}
    assert_error(c.post("/v1/generate", json=body), 401, "authentication_error")
    assert_error(c.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"}),
                 401, "authentication_error")
    ok = c.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    assert c.get("/v1/models").status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert c.get(path).status_code == 200


def test_short_api_keys_are_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(api_keys="short")  # type: ignore[arg-type]


def test_request_timeout_ends_generation(make_client: Callable[..., TestClient]) -> None:
    c = make_client(request_timeout_s=0.01)  # 480 tokens of the tiny full take ~80 ms
    resp = c.post("/v1/generate", json={"prompt": "x", "max_new_tokens": 480,
                                        "variant": "full"})
    assert_error(resp, 504, "timeout")
    text = c.get("/metrics").text
    assert ('greenroute_requests_total{endpoint="/v1/generate",status="timeout",'
            'variant="full"} 1.0') in text


def test_not_ready_until_the_ladder_loads(tmp_path: Any) -> None:
    from app.main import create_app

    with TestClient(create_app(Settings(ladder_dir=tmp_path))) as c:
        resp = wait_ready_says(c.get, "build the ladder first")
        assert_error(resp, 503, "not_ready")
        assert "build the ladder first" in resp.json()["error"]["message"]
        assert c.get("/health").status_code == 200
        assert_error(c.post("/v1/generate", json={"prompt": "x"}), 503, "not_ready")


def test_variant_threads_are_parsed_and_checked_at_start_up() -> None:
    assert Settings(variant_threads="int8=1, full=3").variant_threads == {"int8": 1, "full": 3}  # type: ignore[arg-type]
    assert Settings(variant_threads="").variant_threads == {}  # type: ignore[arg-type]
    for bad in ("int8", "int8=", "=2", "int8=two"):
        with pytest.raises(ValueError, match="NAME=THREADS"):
            Settings(variant_threads=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-256"):
        Settings(variant_threads="int8=0")  # type: ignore[arg-type]
    assert Settings().variant_threads is None  # unset: the build's measured choice
    s = Settings(threads=4, variant_threads="int8=1")  # type: ignore[arg-type]
    measured = Manifest.model_construct(variants={})
    assert s.threads_by_variant(measured) == {"int8": 1}
    assert Settings().threads_by_variant(None) == {}


def test_each_variant_runs_on_its_own_thread_count(
        make_client: Callable[..., TestClient]) -> None:
    c = make_client(threads=2, variant_threads={"int8": 1, "distilled": 1}, wide_from_rows=4)
    execution = {v["name"]: v["execution"] for v in c.get("/v1/variants").json()["data"]
                 if v["loaded"]}
    assert execution["int8"]["threads"] == 1 and execution["distilled"]["threads"] == 1
    assert execution["full"]["threads"] == 2
    # the one-core rungs keep a session on both cores for wide forwards; full needs none
    assert (execution["int8"]["wide_threads"], execution["int8"]["wide_from_rows"]) == (2, 4)
    assert "wide_threads" not in execution["full"]
    narrow = make_client(threads=2, variant_threads={"int8": 1}, wide_from_rows=0)
    execution = {v["name"]: v["execution"] for v in narrow.get("/v1/variants").json()["data"]
                 if v["loaded"]}
    assert "wide_threads" not in execution["int8"]
    # a one-core rung still serves
    resp = c.post("/v1/generate", json={"prompt": "def", "max_new_tokens": 4, "variant": "int8"})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/generate", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/generate", '{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
    ("/v1/completions", '{"model": "auto", "prompt": "\\ud83d"}', "prompt"),
    ("/v1/chat/completions",
     '{"model": "auto", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
     "messages.0.content"),
], ids=["native prompt", "native stop", "completions prompt", "chat content"])
def test_a_lone_surrogate_is_a_422_not_a_500(strict: TestClient, path: str, raw: str,
                                             param: str) -> None:
    resp = strict.post(path, content=raw, headers={"content-type": "application/json"})
    assert_error(resp, 422, param=param)
    message = resp.json()["error"]["message"]
    assert "surrogate" in message or "unicode" in message
    # a surrogate pair (a real character) is fine
    ok = strict.post("/v1/generate", content='{"prompt": "\\ud83d\\ude00", "max_new_tokens": 2}',
                     headers={"content-type": "application/json"})
    assert ok.status_code == 200


def test_an_oversized_stop_sequence_is_refused(strict: TestClient) -> None:
    assert_error(strict.post("/v1/generate", json={"prompt": "x", "stop": ["s" * 257]}), 422,
                 param="stop")
    assert strict.post("/v1/generate", json={"prompt": "x", "stop": ["s" * 256],
                                             "max_new_tokens": 2}).status_code == 200


def test_ready_reports_a_load_failure_without_file_system_paths(tmp_path: Any) -> None:
    from app.main import create_app

    hidden = tmp_path / "secret-layout" / "ladder"
    hidden.mkdir(parents=True)
    with TestClient(create_app(Settings(ladder_dir=hidden))) as c:
        resp = wait_ready_says(c.get, "build the ladder first")
        assert_error(resp, 503, "not_ready")
        assert "secret-layout" not in resp.text and str(tmp_path) not in resp.text


@pytest.mark.parametrize(("host", "keys", "warned"), [
    ("127.0.0.1", [], False), ("::1", [], False), ("localhost", [], False),
    ("0.0.0.0", [], True), ("10.1.2.3", [], True), ("example.internal", [], True),
    ("0.0.0.0", ["a-key-of-sixteen-chars"], False),
])
def test_listening_beyond_loopback_without_keys_is_warned(host: str, keys: list[str],
                                                          warned: bool) -> None:
    from app.settings import open_binding_warning

    warning = open_binding_warning(host, Settings(api_keys=keys))
    assert (warning is not None) == warned
    if warning:
        assert "GREENROUTE_API_KEYS" in warning


def test_a_worst_case_over_the_memory_limit_refuses_to_start(
        make_client: Callable[..., TestClient], tiny_ladder: Any) -> None:
    from app.main import create_app

    fits = make_client(memory_limit_bytes=2**40)
    kv = sum(b.slots.kv_bytes for b in fits.app.state.service.executor.lane.batches.values())  # type: ignore[attr-defined]
    assert kv > 0
    with TestClient(create_app(Settings(ladder_dir=tiny_ladder, threads=1,
                                        memory_limit_bytes=kv // 2))) as c:
        resp = wait_ready_says(c.get, "memory")
        err = assert_error(resp, 503, "not_ready")
        assert "does not fit in memory" in err["message"]
        assert "GREENROUTE_MAX_BATCH" in err["message"]
