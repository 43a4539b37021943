"""Request and response models: the error envelope, native ``/v1/generate``, operations.

Requests are strict: a number where a number belongs (an integer may be written ``3.0``, as
JSON Schema allows), a boolean where a boolean belongs; ``"1"`` or ``true`` for a number is a
422, never coerced. Limits that follow settings (max tokens, prompt length, stop count) are
checked by the routes and written into the OpenAPI document per app (:mod:`app.openapi`).
OpenAI-compatible models are in :mod:`app.openai_schemas`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from models.runtime.engine.base import FinishReason


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes ``3.0``: a float without a fraction becomes an int
    (anything else is left for strict validation to refuse)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


Int = Annotated[int, BeforeValidator(_integral)]
SEED_LIMIT = 2**63  # seeds are below it (a power of two: exact as a JSON Schema float bound)
# constraints before the integral conversion, so that they reach the integer's JSON schema
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT), BeforeValidator(_integral)] | None
Tokens = Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None  # limit set per app
# At least one character other than ASCII whitespace (documented; the routes check the same):
# an explicit class, because `\s` differs between regex engines (Python's counts U+001C-U+001F,
# JSON Schema's ECMA-262 does not).
NON_BLANK = r"[^ \t\n\r\f\v]"
# one stop sequence or a list (count limit set per app); empty strings are refused by the route
Stop = Annotated[
    list[str], BeforeValidator(_stop_list),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1},
                              {"type": "array", "items": {"type": "string", "minLength": 1}},
                              {"type": "null"}],
                    "description": "stop sequence(s): generation ends before the first match"}),
]


class StrictModel(BaseModel):
    """No lax coercion: ``"0.5"``, ``false`` or ``1`` are not numbers or booleans here."""

    model_config = ConfigDict(strict=True)


# -- errors -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_request_error")
    message: str = Field(description="what went wrong and what to do about it")
    param: str | None = Field(description="the request field at fault, dotted")
    code: str | None = Field(description="the same as type")


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"type", "message", "param", "code"}}``."""

    error: ErrorDetail


# -- native generation ------------------------------------------------------------------------
class BudgetIn(StrictModel):
    """A request's energy budget; missing fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float | None = Field(None, gt=0, description="end-to-end latency target, ms")
    min_quality: float | None = Field(None, ge=0.0, le=1.0, description="quality floor, 0-1")
    max_joules: float | None = Field(None, gt=0, description="energy cap per request, J")


class GenerateRequest(StrictModel):
    """``POST /v1/generate``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, json_schema_extra={"pattern": NON_BLANK})
    max_new_tokens: Tokens = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0)
    seed: Seed = None
    stop: Stop = Field(default_factory=list)
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence "
                             "token, up to max_new_tokens (benchmarks; as vLLM's ignore_eos)")
    stream: bool = False
    variant: str | None = Field(None, description="pin a variant; omit or 'auto' to route")
    budget: BudgetIn | None = None


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
    # the MLCommons power proposal's names: prefill + generation = joules
    prefill_energy_joules: float = Field(description="the prompt's forwards' share of joules")
    generation_energy_joules: float = Field(description="the generated tokens' steps' share")
    energy_per_token_joules: float | None = Field(description="generation_energy_joules per "
                                                  "generated token (joules_per_token counts "
                                                  "the prefill too)")
    measurement_method: str = Field(description="how the joules were measured: the meter "
                                    "(nvml, rapl or estimate) and the ledger's split")


class RouteOut(BaseModel):
    variant: str
    reason: str
    predicted_latency_ms: float | None
    predicted_joules: float | None
    candidates: list[dict[str, Any]]
    latency_budget_ms: float | None = Field(None, description="the request's latency target")
    latency_met: bool | None = Field(None, description="whether the end-to-end latency fitted "
                                     "the budget (a routing target, not a cap)")
    max_joules: float | None = Field(None, description="the request's energy cap, if any")
    max_joules_reached: bool = Field(False, description="generation stopped at the energy cap "
                                     "(finish_reason 'energy'; OpenAI endpoints say 'length')")


class GenerateResponse(BaseModel):
    id: str
    text: str
    variant: str
    finish_reason: FinishReason
    usage: Usage
    energy: EnergyOut
    latency_ms: float
    queue_ms: float
    route: RouteOut


# -- recent requests (GET /v1/requests/recent) ---------------------------------------------
class BudgetOut(BaseModel):
    """The budget a request was routed under, server defaults filled in."""

    latency_ms: float
    min_quality: float
    max_joules: float | None


class RecentRequest(BaseModel):
    """One finished request's cost and route (no prompt, no text)."""

    id: str
    endpoint: str
    finished_at: float = Field(description="when it finished, Unix seconds")
    variant: str
    pinned: bool = Field(description="the caller named the variant")
    finish_reason: FinishReason
    usage: Usage
    budget: BudgetOut
    energy: EnergyOut
    latency_ms: float
    queue_ms: float
    route: RouteOut


class RecentList(BaseModel):
    object: Literal["list"] = "list"
    size: int = Field(description="most entries kept (GREENROUTE_RECENT_REQUESTS)")
    data: list[RecentRequest] = Field(description="newest last")


# -- ladder and operations --------------------------------------------------------------------
class EnergyMeterOut(BaseModel):
    source: str
    device: str
    estimated: bool
    description: str


class VariantOut(BaseModel):
    """A manifest entry (all its fields) plus its load state and live cost coefficients."""

    model_config = ConfigDict(extra="allow")

    name: str
    quality: float
    loaded: bool
    error: str | None
    runtime: str | None
    cost: dict[str, Any] | None
    execution: dict[str, Any] | None = None


class VariantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VariantOut]
    device: str
    chat_template: Literal["checkpoint", "fallback"]
    power_watts: float
    power_capped: bool
    energy_meter: EnergyMeterOut
    # per max_tokens class (rounded up to a power of two): the share of it answers used, which
    # energy is priced over (latency keeps the bound); empty until answers have ended
    answer_lengths: dict[str, dict[str, float | int]] = {}


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    variants: list[str]
    failed: dict[str, str]
    device: str
