"""The default model's chat prompt template (it was trained on plain documentation text).

    {system}\\n\\n            (only when a system message is given)
    User: {content}\\n
    Assistant: {content}\\n
    ...
    Assistant:

Generation stops at ``\\nUser:`` so the model does not write the next user turn.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.schemas import ChatMessage

CHAT_STOP = "\nUser:"


def render(messages: Sequence[ChatMessage]) -> str:
    parts: list[str] = []
    for m in messages:
        if m.role == "system":
            parts.append(f"{m.content}\n\n")
        elif m.role == "user":
            parts.append(f"User: {m.content}\n")
        else:
            parts.append(f"Assistant: {m.content}\n")
    parts.append("Assistant:")
    return "".join(parts)
