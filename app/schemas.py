"""Request and response models: native ``/v1/generate`` and the OpenAI-compatible endpoints.

Field limits that depend on settings (max tokens, prompt length) are checked in
:func:`app.deps`-level helpers so that they follow configuration, not import-time constants.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class BudgetIn(BaseModel):
    """A request's energy budget; missing fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float | None = Field(None, gt=0, description="end-to-end latency target, ms")
    min_quality: float | None = Field(None, ge=0.0, le=1.0, description="quality floor, 0-1")
    max_joules: float | None = Field(None, gt=0, description="energy cap per request, J")


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class GenerateRequest(BaseModel):
    """``POST /v1/generate``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    variant: str | None = Field(None, description="pin a variant; omit or 'auto' to route")
    budget: BudgetIn | None = None

    _split_stop = field_validator("stop", mode="before")(_stop_list)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class EnergyOut(BaseModel):
    joules: float
    avg_watts: float
    source: str
    device: str
    estimated: bool
    joules_per_token: float | None
    note: str | None = None  # how the number came about (estimate formula, short window, ...)
    gco2e: float | None = None  # grams CO2e, when a grid carbon intensity is configured


class RouteOut(BaseModel):
    variant: str
    reason: str
    predicted_latency_ms: float | None
    predicted_joules: float | None
    candidates: list[dict[str, Any]]


class GenerateResponse(BaseModel):
    id: str
    text: str
    variant: str
    finish_reason: str
    usage: Usage
    energy: EnergyOut
    latency_ms: float
    queue_ms: float
    route: RouteOut


# -- OpenAI-compatible ------------------------------------------------------------------------
class OpenAIBase(BaseModel):
    """Fields both OpenAI endpoints share, plus greenroute's budget extras."""

    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are ignored, as OpenAI does

    model: str = "auto"
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    latency_budget_ms: float | None = Field(None, gt=0)
    min_quality: float | None = Field(None, ge=0.0, le=1.0)
    max_joules: float | None = Field(None, gt=0)

    _split_stop = field_validator("stop", mode="before")(_stop_list)


class CompletionRequest(OpenAIBase):
    """``POST /v1/completions``: a single prompt string (or a list holding one)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("prompt must not be empty")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(BaseModel):
    """One part of a message's content list (``{"type": "text", "text": ...}``); other types
    (``image_url``, ``input_audio``, ...) parse here so that they can be refused by name."""

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
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

    messages: list[ChatMessage] = Field(min_length=1)
