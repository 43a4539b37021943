"""All service settings in one pydantic-settings class (``GREENROUTE_*`` environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.runtime.manifest import Manifest, default_ladder_dir


class Settings(BaseSettings):
    """Validated once at start-up and passed in; nothing reads ``os.environ`` deeper down."""

    model_config = SettingsConfigDict(env_prefix="GREENROUTE_", extra="ignore",
                                      populate_by_name=True)

    # where the ladder is and how it runs
    ladder_dir: Path = Field(default_factory=default_ladder_dir)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(2, ge=1, le=256, description="intra-op threads per session")
    variant_threads: Annotated[dict[str, int] | None, NoDecode] = Field(
        None, description="threads of named variants, overriding `threads` (NAME=N,...; names "
        "absent from the ladder are skipped); unset: the build's measured choice (the "
        "manifest's `serve_threads`), empty: every variant on `threads`")
    wide_from_rows: int = Field(4, ge=0, description="a variant on fewer threads than "
                                "`threads` also keeps a session on `threads`, used for steps of "
                                "at least this many rows and prompts of at least this many "
                                "tokens (0: never)")
    runtime: Literal["auto", "onnxruntime", "onnxruntime-genai"] = "auto"
    variants: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="load only these variants (comma-separated)")

    # request defaults and limits
    default_max_new_tokens: int = Field(64, ge=1)
    max_new_tokens_limit: int = Field(512, ge=1)
    max_prompt_chars: int = Field(16_000, ge=1, description="longest prompt, and longest chat "
                                  "message content or content part")
    max_messages: int = Field(256, ge=1, description="most messages in one chat request")
    max_content_parts: int = Field(64, ge=1, description="most content parts in one message")
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_chars: int = Field(256, ge=1, description="longest stop sequence (characters)")
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    default_min_quality: float = Field(0.0, ge=0.0, le=1.0)
    default_latency_ms: float = Field(30_000.0, gt=0)
    on_infeasible: Literal["best_effort", "reject"] = "best_effort"
    power_cap_watts: float | None = Field(None, gt=0)
    power_window_s: float = Field(5.0, gt=0)

    # continuous batching, admission and time limits
    max_batch: int = Field(16, ge=1, le=256, description="rows in each variant's continuous "
                           "batch (requests decoded together)")
    max_seq_tokens: int = Field(2048, ge=16, description="prompt + generated tokens per row "
                                "(capped by the model's context; KV memory grows with it)")
    prefill_token_budget: int = Field(512, ge=1, description="prompt tokens prefilled per "
                                      "scheduling turn, between steps (at least one request)")
    queue_size: int = Field(8, ge=1, description="requests waiting for a row per lane before "
                            "429")
    speculate_below_rows: int | None = Field(None, ge=0, description="unset: the speculative "
                                             "rung is always offered, priced by its measured "
                                             "steps like every rung (its rounds batch); N: "
                                             "only while fewer rows than N run on the device "
                                             "(0: never)")
    request_timeout_s: float = Field(120.0, gt=0)
    exit_on_lane_failure: bool = Field(True, description="end the process (SIGTERM to itself) "
                                       "when the device lane dies, for its supervisor to "
                                       "restart it")
    memory_limit_bytes: int | None = Field(None, gt=0, description="memory the worst case "
                                           "(every KV row full, plus the weights) must fit; "
                                           "default: the cgroup's limit, else physical memory")
    shutdown_grace_s: float = Field(30.0, ge=0)
    recent_requests: int = Field(200, ge=1, le=10_000, description="finished requests kept "
                                 "in memory for GET /v1/requests/recent and the web page")

    # security
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # energy metering (telemetry/factory.py): best available meter, or the one named here
    energy_meter: Literal["auto", "nvml", "rapl", "estimate"] = "auto"
    gpu_index: int | None = Field(None, ge=0, description="NVML index of the GPU to meter")
    cuda_visible_devices: str | None = Field(None, validation_alias="CUDA_VISIBLE_DEVICES")
    nvml_sample_hz: float = Field(10.0, gt=0, le=1000)
    nvml_counter_period_s: float = Field(0.1, ge=0, le=5)
    rapl_root: Path = Path("/sys/class/powercap")
    device_sample_period_s: float = Field(1.0, gt=0, le=60)
    grid_gco2_per_kwh: float | None = Field(None, ge=0, description="grid carbon intensity")
    # energy estimate (used when no NVML/RAPL meter is available)
    estimate_watts_per_core: float = Field(10.0, gt=0)
    estimate_idle_watts: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _default_within_limit(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) is over "
                             f"max_new_tokens_limit ({self.max_new_tokens_limit}): every "
                             "request that omits it would be refused")
        return self

    @field_validator("variant_threads", mode="before")
    @classmethod
    def _split_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        out: dict[str, int] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, count = part.partition("=")
            if not sep or not name.strip() or not count.strip().isdigit():
                raise ValueError(f"expected NAME=THREADS, got {part!r}")
            out[name.strip()] = int(count)
        return out

    @field_validator("variant_threads")
    @classmethod
    def _threads_in_range(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        bad = {n: t for n, t in (value or {}).items() if not 1 <= t <= 256}
        if bad:
            raise ValueError(f"threads must be 1-256: {bad}")
        return value

    def threads_by_variant(self, manifest: Manifest | None) -> dict[str, int]:
        """Each variant's own thread count: the setting's, else the manifest's measured one."""
        if self.variant_threads is not None:
            return dict(self.variant_threads)
        return manifest.serve_threads() if manifest is not None else {}

    @field_validator("api_keys", "variants", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[str]) -> list[str]:
        short = [k for k in keys if len(k) < 16]
        if short:
            raise ValueError("every API key must be at least 16 characters long")
        return keys


def open_binding_warning(host: str, settings: Settings) -> str | None:
    """A warning when the service would listen beyond this machine with no API key (anyone
    who reaches the address could use it); ``None`` on loopback or with keys set."""
    import ipaddress

    if settings.api_keys or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"listening on {host} with no API key: anyone who can reach this address can "
            "generate (and spend energy); set GREENROUTE_API_KEYS, or bind 127.0.0.1")
