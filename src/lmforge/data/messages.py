"""OpenAI-style conversations: `[{"role": ..., "content": ...}, ...]`, checked and normalised.

Shared by `prepare --task dialogue` (a `{"messages": [...]}` JSONL line), `lmforge chat` and
any caller that renders conversations (`lmforge.inference.chat_format`). Roles are
"system", "user", "assistant" and "tool", case-insensitive, with the aliases other corpora use
("human" is the user; "bot", "gpt", "model" the assistant). Content is a string, or a list
of `{"type": "text", "text": ...}` parts (joined). A bad conversation is a ValueError naming
where it came from (`where`: "data.jsonl: line 7"), the message index and the key.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "bot": "assistant",
                "gpt": "assistant", "model": "assistant", "tool": "tool"}


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    kind = "null" if value is None else type(value).__name__
    raise ValueError(f"{where}: \"content\" must be a string (or a list of {{\"type\": \"text\", \"text\": ...}} "
                     f"parts), got {kind}")


def check_message(message: object, where: str) -> dict[str, str]:
    """One message as {"role": a name of ROLES, "content": text}, or a ValueError naming `where`."""
    if not isinstance(message, dict):
        raise ValueError(f"{where}: a message must be an object with \"role\" and \"content\", "
                         f"got {type(message).__name__}")
    if "role" not in message:
        raise ValueError(f"{where}: no \"role\" (one of {', '.join(ROLES)})")
    role = message["role"]
    name = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
    if name is None:
        raise ValueError(f"{where}: unknown role {role!r} (valid: {', '.join(ROLE_ALIASES)})")
    if "content" not in message:
        raise ValueError(f"{where}: no \"content\"")
    return {"role": name, "content": _content(message["content"], where)}


def check_messages(messages: object, where: str, key: str = "messages") -> list[dict[str, str]]:
    """A whole conversation, checked: a non-empty list of messages (see `check_message`)."""
    if not isinstance(messages, list):
        kind = "null" if messages is None else type(messages).__name__
        raise ValueError(f"{where}: {key!r} must be a list of messages, got {kind}")
    if not messages:
        raise ValueError(f"{where}: {key!r} is empty: a conversation needs at least one message")
    return [check_message(m, f"{where}: {key}[{i}]") for i, m in enumerate(messages)]


def alternating(turns: Sequence[str]) -> list[dict[str, str]]:
    """Plain turns as a conversation: the user first, then the assistant, and so on."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
