"""Per-variant cost model: latency and energy as functions of prompt and generated tokens.

``latency = overhead + prefill_ms_per_token × prompt + decode_ms_per_token × new`` and
``joules = run_seconds × watts``. Seeded from a calibration, then moved toward what this host
actually does by every observed request (exponentially weighted). No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    """Coefficients for one variant (units in the names)."""

    prefill_ms_per_token: float
    decode_ms_per_token: float
    watts: float
    overhead_ms: float = 0.0
    alpha: float = 0.2  # weight of each new observation
    observations: int = 0

    def predict_run_ms(self, prompt_tokens: int, new_tokens: int) -> float:
        return (self.overhead_ms + self.prefill_ms_per_token * prompt_tokens
                + self.decode_ms_per_token * new_tokens)

    def predict_joules(self, prompt_tokens: int, new_tokens: int) -> float:
        return self.predict_run_ms(prompt_tokens, new_tokens) / 1000.0 * self.watts

    def observe(self, prompt_tokens: int, new_tokens: int, first_token_ms: float,
                run_ms: float, joules: float) -> None:
        """Fold in one finished run: time to first token, whole run time, its energy."""
        a = self.alpha
        if new_tokens >= 2 and run_ms > first_token_ms:
            decode = (run_ms - first_token_ms) / (new_tokens - 1)
            self.decode_ms_per_token += a * (decode - self.decode_ms_per_token)
        if prompt_tokens >= 1 and first_token_ms > 0:
            prefill = max(0.0, first_token_ms - self.decode_ms_per_token) / prompt_tokens
            self.prefill_ms_per_token += a * (prefill - self.prefill_ms_per_token)
        if run_ms > 0 and joules >= 0:
            self.watts += a * (joules / (run_ms / 1000.0) - self.watts)
        self.observations += 1

    def as_dict(self) -> dict[str, float | int]:
        return {"prefill_ms_per_token": self.prefill_ms_per_token,
                "decode_ms_per_token": self.decode_ms_per_token, "watts": self.watts,
                "overhead_ms": self.overhead_ms, "observations": self.observations}
