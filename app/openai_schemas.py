"""OpenAI-compatible request and response models (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``), strict like the native ones (:mod:`app.schemas`).

Unknown OpenAI fields are ignored, as OpenAI does; greenroute's budget rides as extra fields
``latency_budget_ms``, ``min_quality`` and ``max_joules``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from app.schemas import NON_BLANK, Int, Seed, Stop, StrictModel, Tokens

# OpenAI's reasons; greenroute's native "energy" (max_joules reached) is reported as "length",
# as a limit on the request's size would be
OpenAIFinishReason = Literal["stop", "length", "cancelled"]


def openai_finish_reason(reason: str) -> OpenAIFinishReason:
    return "length" if reason == "energy" else reason  # type: ignore[return-value]


class OpenAIBase(StrictModel):
    """Fields both OpenAI endpoints share, plus greenroute's budget extras."""

    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored, as OpenAI does

    model: str = Field("auto", description="'auto' (routed) or a variant name")
    max_tokens: Tokens = None
    max_completion_tokens: Tokens = Field(None, description="wins over max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stop: Stop = Field(default_factory=list)
    seed: Seed = None
    user: str | None = None
    latency_budget_ms: float | None = Field(None, gt=0)
    min_quality: float | None = Field(None, ge=0.0, le=1.0)
    max_joules: float | None = Field(None, gt=0)


def _one_prompt_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PROMPT_TEXT = {"type": "string", "minLength": 1, "pattern": NON_BLANK}


class CompletionRequest(OpenAIBase):
    """``POST /v1/completions``: one prompt, as a string or a list holding one string (one
    choice per request; token-id prompts are not supported)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "auto", "prompt": "Hello", "max_tokens": 8},
        {"model": "auto", "prompt": ["Hello"], "max_tokens": 8, "min_quality": 0.8,
         "stream": True}]})

    prompt: Annotated[
        list[str], BeforeValidator(_one_prompt_list),
        WithJsonSchema({"anyOf": [PROMPT_TEXT, {"type": "array", "items": PROMPT_TEXT,
                                                "minItems": 1, "maxItems": 1}],
                        "description": "the prompt: a string, or a list of exactly one"}),
    ]
    max_tokens: Tokens = Field(None, description="default 16 (as OpenAI's), at most the "
                               "server's limit")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: list[str]) -> list[str]:
        if len(value) != 1:
            raise ValueError(f"exactly one prompt is supported, got {len(value)}")
        if not value[0]:
            raise ValueError("prompt must not be empty")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt[0]


class ContentPart(StrictModel):
    """One part of a message's content list (``{"type": "text", "text": ...}``); other types
    (``image_url``, ``input_audio``, ...) parse here so that they can be refused by name (the
    document says ``type`` is ``"text"``)."""

    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})

    type: Annotated[str, WithJsonSchema({"type": "string", "enum": ["text"]})]
    text: Annotated[str | None, WithJsonSchema({"type": "string"})] = None


class ChatMessage(StrictModel):
    """A message whose ``content`` is a string or a list of text parts (joined by newlines,
    as vLLM does); this service serves text-only models, so any other part is a 422."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        for part in value if isinstance(value, list) else ():
            if part.type != "text":
                raise ValueError(f"content part type {part.type!r} is not supported: the "
                                 "served models read text only (send parts of type 'text')")
            if part.text is None:
                raise ValueError("a content part of type 'text' needs a 'text' string")
        return value

    @property
    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class ChatRequest(OpenAIBase):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        {"model": "auto", "max_tokens": 8, "latency_budget_ms": 2000, "stream": True,
         "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}]})

    messages: list[ChatMessage] = Field(min_length=1)


# -- responses --------------------------------------------------------------------------------

class OpenAIUsage(BaseModel):
    """OpenAI's usage plus the request's energy (``gco2e`` when a carbon intensity is set)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    energy_joules: float
    avg_watts: float
    energy_source: str
    energy_estimated: bool
    gco2e: float | None = None
    prefill_energy_joules: float  # the MLCommons power proposal's names (app/schemas.py)
    generation_energy_joules: float
    energy_per_token_joules: float | None
    measurement_method: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    chat_template: Literal["checkpoint", "fallback"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
