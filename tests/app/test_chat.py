"""``/v1/chat/completions`` renders the ladder's chat template (the real app, real start-up).

The tiny ladder has no template, so it gets the fallback; a copy of it with a ChatML
``chat_template.jinja`` (and a tokenizer that adds a BOS, like Llama's) gets the checkpoint's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, processors

from app.settings import Settings
from tests.app.conftest import wait_ready_says
from tests.app.test_api import assert_error

BOS = "<|endoftext|>"  # the tiny tokenizer's only special token (id 0)
CHATML = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('conversations start with a system or user message') }}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is json?"}]
# the same conversation as each template renders it
FALLBACK_TEXT = "Be brief.\n\nUser: What is json?\nAssistant:"
CHATML_TEXT = (f"{BOS}<|im_start|>system\nBe brief.<|im_end|>\n"
               "<|im_start|>user\nWhat is json?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tokenizer(tiny_ladder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_ladder / "tokenizer.json"))


@pytest.fixture(scope="module")
def chatml_ladder(tiny_ladder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ladder plus a ChatML template, its special tokens, and a tokenizer that adds
    BOS when asked to add special tokens (so a second BOS would show in the token count)."""
    out = tmp_path_factory.mktemp("chatml") / "ladder"
    shutil.copytree(tiny_ladder, out)
    (out / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": "<|im_end|>"}), encoding="utf-8")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])])
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def fallback_client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(variants="int8")


@pytest.fixture(scope="module")
def chatml_client(make_client: Callable[..., TestClient], chatml_ladder: Path) -> TestClient:
    return make_client(ladder_dir=chatml_ladder, variants="int8")


def chat(client: TestClient, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={
        "model": "int8", "max_tokens": 4, "temperature": 0, "messages": messages, **extra})


def test_fallback_template_renders_plain_turns(fallback_client: TestClient,
                                               tokenizer: Tokenizer) -> None:
    resp = chat(fallback_client, MESSAGES)
    assert resp.status_code == 200, resp.text
    expected = len(tokenizer.encode(FALLBACK_TEXT, add_special_tokens=False).ids)
    assert resp.json()["usage"]["prompt_tokens"] == expected
    models = fallback_client.get("/v1/models").json()["data"]
    assert {m["chat_template"] for m in models} == {"fallback"}
    assert fallback_client.get("/v1/variants").json()["chat_template"] == "fallback"


def test_fallback_stop_does_not_use_up_the_callers_stops(fallback_client: TestClient) -> None:
    stops = ["\n\n", "###", "END", "Q:"]  # the limit (4); the fallback's "\nUser:" rides extra
    assert len(stops) == Settings().max_stop_sequences
    assert chat(fallback_client, MESSAGES, stop=stops).status_code == 200


def test_checkpoint_template_is_rendered_and_encoded_without_a_second_bos(
        chatml_client: TestClient, tokenizer: Tokenizer, chatml_ladder: Path) -> None:
    bos_adding = Tokenizer.from_file(str(chatml_ladder / "tokenizer.json"))
    expected = len(bos_adding.encode(CHATML_TEXT, add_special_tokens=False).ids)
    # the check can fail: an extra BOS or the fallback rendering would change the count
    assert len(bos_adding.encode(CHATML_TEXT).ids) == expected + 1
    assert len(tokenizer.encode(FALLBACK_TEXT, add_special_tokens=False).ids) != expected
    resp = chat(chatml_client, MESSAGES)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == expected
    models = chatml_client.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"auto", "int8"}
    assert {m["chat_template"] for m in models} == {"checkpoint"}
    assert chatml_client.get("/v1/variants").json()["chat_template"] == "checkpoint"


def test_completions_stay_raw_text_with_a_checkpoint_template(
        chatml_client: TestClient, chatml_ladder: Path) -> None:
    bos_adding = Tokenizer.from_file(str(chatml_ladder / "tokenizer.json"))
    resp = chatml_client.post("/v1/completions", json={
        "model": "int8", "prompt": "What is json?", "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    expected = len(bos_adding.encode("What is json?", add_special_tokens=False).ids)
    assert resp.json()["usage"]["prompt_tokens"] == expected


def test_template_refusal_is_a_422(chatml_client: TestClient) -> None:
    err = assert_error(chat(chatml_client, [{"role": "assistant", "content": "Hi"}]), 422,
                       "invalid_request_error", "messages")
    assert "conversations start with a system or user message" in err["message"]


@pytest.mark.parametrize("parts", [
    [{"type": "text", "text": "What is json?"}],
    [{"type": "text", "text": "What is"}, {"type": "text", "text": "json?"}],
])
def test_text_parts_equal_the_string_form(fallback_client: TestClient,
                                          parts: list[dict[str, str]]) -> None:
    as_string = "\n".join(p["text"] for p in parts)  # parts are joined by newlines
    by_parts = chat(fallback_client, [{"role": "user", "content": parts}])
    by_string = chat(fallback_client, [{"role": "user", "content": as_string}])
    assert by_parts.status_code == by_string.status_code == 200, by_parts.text
    assert by_parts.json()["usage"]["prompt_tokens"] == by_string.json()["usage"]["prompt_tokens"]
    assert (by_parts.json()["choices"][0]["message"]["content"]
            == by_string.json()["choices"][0]["message"]["content"])


def test_non_text_part_is_a_422_naming_its_type(fallback_client: TestClient) -> None:
    resp = chat(fallback_client, [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    err = assert_error(resp, 422, "invalid_request_error", "messages.0.content")
    assert "'image_url'" in err["message"] and "not supported" in err["message"]


def test_broken_template_fails_start_up_with_a_clear_reason(tmp_path: Path) -> None:
    from app.main import create_app

    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}", encoding="utf-8")
    with TestClient(create_app(Settings(ladder_dir=tmp_path))) as c:
        resp = wait_ready_says(c.get, "chat template")
        err = assert_error(resp, 503, "not_ready")
        assert "checkpoint chat template" in err["message"]
