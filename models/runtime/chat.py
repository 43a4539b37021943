"""Chat prompts: the checkpoint's own chat template (Jinja2, as transformers, vLLM and TGI render
it), or a documented plain fallback for checkpoints that have none.

The build copies the template into the ladder (``chat_template.jinja``, with the special tokens
in ``tokenizer_config.json``); serving renders it here with no transformers import.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

# Used only when the checkpoint has no template: an optional system line, then
# "User: ..." / "Assistant: ..." turns, ending with "Assistant:"; generation stops at "\nUser:".
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = "\nUser:"


def _token_text(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or ``{"content": ...}`` objects."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and what generation should stop at."""

    source: Literal["checkpoint", "fallback"]
    text: str
    bos_token: str | None = None
    eos_token: str | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Extra stop strings for this template (the fallback's next-user marker)."""
        return (FALLBACK_STOP,) if self.source == "fallback" else ()

    @classmethod
    def for_directory(cls, directory: Path) -> ChatTemplate:
        """The template in ``directory`` (``chat_template.jinja`` or the ``chat_template`` key of
        ``tokenizer_config.json``), else the fallback."""
        config: dict[str, Any] = {}
        if (directory / TOKENIZER_CONFIG).is_file():
            config = json.loads((directory / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        text: Any = None
        if (directory / TEMPLATE_FILE).is_file():
            text = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        else:
            text = config.get("chat_template")
            if isinstance(text, list):  # named templates: use "default"
                text = next((t.get("template") for t in text if t.get("name") == "default"),
                            None)
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        if isinstance(text, str) and text.strip():
            return cls("checkpoint", text, bos, eos)
        return cls("fallback", FALLBACK_TEMPLATE, bos, eos)

    def render(self, messages: Sequence[Mapping[str, str]],
               add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (each ``{"role", "content"}``)."""
        return _compiled(self.text).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


@functools.lru_cache(maxsize=8)
def _compiled(text: str) -> Any:
    """Compile once per template text, sandboxed, with the extensions and filters transformers
    gives templates (``loopcontrols``, ``tojson``, ``raise_exception``)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=False)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text)
