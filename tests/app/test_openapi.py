"""The OpenAPI document tells the truth (statuses, envelope, media types, this app's limits,
auth), and the OpenAI endpoints accept what it declares and refuse what it does not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.app.test_api import assert_error

GENERATION = {"/v1/generate", "/v1/completions", "/v1/chat/completions"}
ENVELOPE = "#/components/schemas/ErrorResponse"
LIMITS = {"max_prompt_chars": 20, "max_messages": 2, "max_content_parts": 2,
          "max_new_tokens_limit": 8, "default_max_new_tokens": 8, "max_stop_sequences": 1}


@pytest.fixture(scope="module")
def limited(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(**LIMITS)


@pytest.fixture(scope="module")
def doc(limited: TestClient) -> dict[str, Any]:
    resp = limited.get("/openapi.json")
    assert resp.status_code == 200
    return dict(resp.json())


def operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": op for path, ops in doc["paths"].items()
            for method, op in ops.items()}


def test_every_operation_documents_its_statuses_with_the_envelope(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    assert set(ops) == {"GET /health", "GET /ready", "GET /metrics", "POST /v1/generate",
                        "GET /v1/variants", "POST /v1/completions", "POST /v1/chat/completions",
                        "GET /v1/models", "GET /v1/requests/recent"}
    for path in GENERATION:
        assert set(ops[f"POST {path}"]["responses"]) == {
            "200", "400", "404", "413", "422", "429", "500", "503", "504"}, path
    for name in ("GET /v1/variants", "GET /v1/models", "GET /ready"):
        assert set(ops[name]["responses"]) == {"200", "503"}, name
    assert set(ops["GET /v1/requests/recent"]["responses"]) == {"200", "422"}
    (limit,) = ops["GET /v1/requests/recent"]["parameters"]
    assert limit["in"] == "query" and not limit["required"]
    assert {b.get("type") for b in limit["schema"]["anyOf"]} == {"integer", "null"}
    for name, op in ops.items():
        for status, answer in op["responses"].items():
            if status != "200":
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": ENVELOPE}, (name, status)
    assert ops["POST /v1/generate"]["responses"]["429"]["headers"]["Retry-After"]
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"type", "message", "param", "code"}


def test_the_page_is_not_an_api_operation(doc: dict[str, Any], limited: TestClient) -> None:
    assert "/" not in doc["paths"] and not any(p.startswith("/static") for p in doc["paths"])
    assert limited.get("/").headers["content-type"].startswith("text/html")


def test_media_types_are_the_ones_sent(doc: dict[str, Any], limited: TestClient) -> None:
    ops = operations(doc)
    assert set(ops["GET /metrics"]["responses"]["200"]["content"]) == {
        "text/plain", "application/openmetrics-text"}
    assert limited.get("/metrics").headers["content-type"].startswith("text/plain")
    for path in GENERATION:
        assert set(ops[f"POST {path}"]["responses"]["200"]["content"]) == {
            "application/json", "text/event-stream"}, path


def test_limits_are_this_apps_settings(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]

    def integer(model: str, field: str) -> dict[str, Any]:
        (branch,) = [b for b in schemas[model]["properties"][field]["anyOf"]
                     if b["type"] == "integer"]
        return dict(branch)

    assert integer("GenerateRequest", "max_new_tokens")["maximum"] == 8
    assert integer("ChatRequest", "max_completion_tokens")["maximum"] == 8
    assert integer("CompletionRequest", "seed")["exclusiveMaximum"] == 2**63  # exact integer
    assert schemas["GenerateRequest"]["properties"]["prompt"]["maxLength"] == 20
    assert schemas["ChatRequest"]["properties"]["messages"]["maxItems"] == 2
    content = {b["type"]: b for b in schemas["ChatMessage"]["properties"]["content"]["anyOf"]}
    assert content["string"]["maxLength"] == 20 and content["array"]["maxItems"] == 2
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {(b["type"], b.get("maxItems")) for b in prompt} == {("string", None), ("array", 1)}
    stop = {b["type"]: b for b in schemas["GenerateRequest"]["properties"]["stop"]["anyOf"]}
    assert stop["array"]["maxItems"] == 1
    assert schemas["ContentPart"]["properties"]["type"]["enum"] == ["text"]


def test_auth_is_documented_only_when_keys_are_set(doc: dict[str, Any],
                                                   make_client: Callable[..., TestClient]) -> None:
    assert "securitySchemes" not in doc["components"]
    assert all("401" not in op["responses"] for op in operations(doc).values())
    keyed = make_client(api_keys=["k" * 20]).get("/openapi.json").json()
    assert keyed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = operations(keyed)
    guarded = {name for name, op in ops.items() if op.get("security")}
    assert guarded == {name for name in ops if " /v1/" in name}
    assert all("401" in ops[name]["responses"] for name in guarded)


def test_default_tokens_over_the_limit_are_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        Settings(default_max_new_tokens=100, max_new_tokens_limit=50)


OPENAI_BAD: list[tuple[str, str, dict[str, Any], str]] = [
    ("bool for a number", "/v1/completions", {"prompt": "x", "min_quality": False},
     "min_quality"),
    ("bool for a number", "/v1/chat/completions", {"min_quality": True}, "min_quality"),
    ("numeric string", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("number for a bool", "/v1/chat/completions", {"stream": 0}, "stream"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, "prompt"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("blank prompt", "/v1/completions", {"prompt": [" \n"]}, "prompt"),
    ("prompt over the limit", "/v1/completions", {"prompt": "x" * 21}, "prompt"),
    ("unused max_tokens over the limit", "/v1/completions",
     {"prompt": "x", "max_tokens": 9, "max_completion_tokens": 2}, "max_tokens"),
    ("too many messages", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}] * 3}, "messages"),
    ("content over the limit", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x" * 21}]}, "messages.0.content"),
    ("too many parts", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 3}]},
     "messages.0.content"),
    ("part over the limit", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 21}]}]},
     "messages.0.content.0.text"),
    ("two stops over a limit of one", "/v1/chat/completions", {"stop": ["a", "b"]}, "stop"),
]


@pytest.mark.parametrize(("name", "path", "body", "param"), OPENAI_BAD,
                         ids=[f"{c[1]} {c[0]}" for c in OPENAI_BAD])
def test_openai_refuses_what_the_document_does_not_declare(
        limited: TestClient, name: str, path: str, body: dict[str, Any], param: str) -> None:
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "Hi"}], **body}
    err = assert_error(limited.post(path, json=body), 422, "invalid_request_error", param)
    if name in ("empty prompt list", "two prompts"):
        assert "exactly one prompt is supported" in err["message"]


def test_openai_accepts_what_the_document_declares(limited: TestClient) -> None:
    # "\x1c" is whitespace to Python's str.strip(), not to JSON Schema's pattern
    for prompt in ("x", ["x"], "\x1c\x1c"):
        resp = limited.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2.0,
                                                     "stop": "\n\n", "n": 1.0, "seed": None})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["choices"]) == 1
    resp = limited.post("/v1/chat/completions", json={
        "max_tokens": 8, "stop": None, "messages": [
            {"role": "system", "content": "x" * 20},
            {"role": "user", "content": [{"type": "text", "text": "y" * 20}] * 2}]})
    assert resp.status_code == 200, resp.text
