"""Conversations -> the prompt ids a model answers, and the ids that end its reply.

The one API for anything that chats with a model (`lmforge chat`, a server, a notebook):

    fmt = chat_format_for(tokenizer, checkpoint_folder)      # or chat_format_of(loaded_model)
    prompt = fmt.prompt_ids([{"role": "user", "content": "hi"}], max_tokens=context - room)
    ... generate from `prompt` until a token of `fmt.stop_ids` ...

Two formats, chosen by the checkpoint:

- `TemplateFormat`: the checkpoint's own chat template (an imported model's
  tokenizer_config.json or chat_template.jinja, kept by training), rendered with
  `add_generation_prompt` as transformers does (`lmforge.data.chat_template`); a reply stops
  at the template's end-of-turn token (found by rendering an exchange), the EOS token and
  generation_config.json's eos ids. A control token typed inside a message ("<|im_end|>") is
  encoded as plain text: only the template writes control tokens.
- `ChitchatFormat`: GPT2-chitchat's `[CLS] u1 [SEP] u2 [SEP]` for models trained from scratch
  (`lmforge.data.dialogue_format`); a reply stops at [SEP]. System and tool messages count as
  the user's turns; special-token text typed in a message is plain text.

Messages are OpenAI-style `{"role", "content"}` (checked by `lmforge.data.messages`); one
may carry `token_ids`, the ids it was generated as, which the chitchat format uses instead of
encoding its text again. `prompt_ids(..., max_tokens)` drops the oldest exchanges (a leading
system message stays; what is left starts with a user turn) until the prompt fits; a last
message longer than that alone keeps its end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from lmforge.base.tokenizer import special_ids
from lmforge.base.tokenizer_config import TokenizerSettings, tokenizer_settings
from lmforge.data.chat_template import ChatTemplate
from lmforge.data.dialogue_format import RESPONSE, USER, build_sample, dialogue_specials
from lmforge.data.messages import check_message
from lmforge.inference.checks import check_text


class ChatFormat(Protocol):
    name: str
    """"template" or "chitchat"."""
    stop_ids: tuple[int, ...]
    """Token ids that end a reply."""

    def encode(self, text: str) -> list[int]:
        """One turn's text as ids, special-token text as plain text ([UNK] for text that leaves none)."""

    def prompt_ids(self, messages: Sequence[Mapping], max_tokens: int | None = None) -> list[int]:
        """The prompt for the assistant's next reply to `messages`, at most `max_tokens` ids."""


def _checked(messages: Sequence[Mapping]) -> list[dict]:
    out = []
    for i, message in enumerate(messages):
        checked = check_message(message, f"messages[{i}]")
        check_text(checked["content"], f"messages[{i}] content")
        if isinstance(message, Mapping) and message.get("token_ids") is not None:
            checked["token_ids"] = [int(t) for t in message["token_ids"]]
        out.append(checked)
    if not out:
        raise ValueError("messages is empty: a conversation needs at least one message")
    return out


def _fitting(messages: list[dict], render, max_tokens: int | None) -> list[int]:
    """render(messages) with the oldest turns dropped (a leading system message kept) until it fits."""
    system = messages[:1] if messages[0]["role"] == "system" and len(messages) > 1 else []
    rest = messages[len(system):]
    ids = render(system + rest)
    while max_tokens is not None and len(ids) > max_tokens and len(rest) > 1:
        # whole exchanges go: the rest still starts with the user (a template may insist on it)
        users = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        rest = rest[users[0]:] if users else rest[-1:]
        ids = render(system + rest)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[len(ids) - max_tokens:]
    return ids


def _encode_turn(tokenizer: Tokenizer, text: str, unk: int | None) -> list[int]:
    tokenizer.encode_special_tokens = True  # typed "[SEP]" is text, not a turn boundary
    ids = tokenizer.encode(check_text(text, "the turn"), add_special_tokens=False).ids
    return [unk] if not ids and text.strip() and unk is not None else ids


class ChitchatFormat:
    """`[CLS] u1 [SEP] u2 [SEP] ... user [SEP]`; the reply ends at [SEP]."""

    name = "chitchat"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = special_ids(tokenizer)
        self.cls, self.sep = dialogue_specials(self.specials)
        self.stop_ids = (self.sep,)

    def encode(self, text: str) -> list[int]:
        return _encode_turn(self.tokenizer, text, self.specials.unk)

    def prompt_ids(self, messages: Sequence[Mapping], max_tokens: int | None = None) -> list[int]:
        messages = _checked(messages)
        turns = [m.get("token_ids") or self.encode(m["content"]) for m in messages]
        roles = [RESPONSE if m["role"] == "assistant" else USER for m in messages]
        kept = [(t, r) for t, r in zip(turns, roles) if t]
        if not kept:
            raise ValueError("messages: no message has any text")
        limit = None if max_tokens is None else max(3, max_tokens)
        return build_sample([t for t, _ in kept], [r for _, r in kept], self.cls, self.sep, limit)[0]


class TemplateFormat:
    """The checkpoint's chat template, with the generation prompt; stops at the end of the turn."""

    name = "template"

    def __init__(self, tokenizer: Tokenizer, settings: TokenizerSettings) -> None:
        if settings.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.template = ChatTemplate(settings.chat_template, settings.tokens,
                                     settings.template_source or "chat template")
        specials = self.specials = special_ids(tokenizer, settings)
        ends = self.template.end_of_turn_ids(tokenizer)
        eos = [specials.eos] if specials.eos is not None else []
        self.stop_ids = tuple(dict.fromkeys([*ends, *eos, *settings.generation_eos_ids]))
        if not self.stop_ids:
            raise ValueError(f"{settings.template_source}: no token ends a reply (the template writes no "
                             f"special token after the assistant's text, and there is no eos_token)")

    def encode(self, text: str) -> list[int]:
        return _encode_turn(self.tokenizer, text, self.specials.unk)

    def prompt_ids(self, messages: Sequence[Mapping], max_tokens: int | None = None) -> list[int]:
        messages = [{"role": m["role"], "content": m["content"]} for m in _checked(messages)]

        def render(part: list[dict]) -> list[int]:
            self.tokenizer.encode_special_tokens = False  # the template's control tokens are tokens
            return self.template.encode_sanitized(self.tokenizer, part, add_generation_prompt=True)

        return _fitting(messages, render, max_tokens)


def chat_format_for(tokenizer: Tokenizer, folder: Path | None, prefer: str = "auto") -> ChatFormat:
    """The format of the checkpoint (or tokenizer) folder: its chat template when it has one
    (`prefer="auto"` or "template"), else the chitchat format (`prefer="chitchat"` forces it)."""
    if prefer not in ("auto", "template", "chitchat"):
        raise ValueError(f"chat format must be auto, template or chitchat, got {prefer!r}")
    settings = tokenizer_settings(folder) if folder is not None else TokenizerSettings()
    if prefer == "template" and settings.chat_template is None:
        raise ValueError(f"{folder}: no chat template (no chat_template in tokenizer_config.json, no "
                         f"chat_template.jinja); it chats in the chitchat format")
    if prefer != "chitchat" and settings.chat_template is not None:
        return TemplateFormat(tokenizer, settings)
    return ChitchatFormat(tokenizer)


def chat_format_of(loaded, prefer: str = "auto") -> ChatFormat:
    """`chat_format_for` of a `lmforge.inference.loaded.LoadedModel`."""
    return chat_format_for(loaded.tokenizer, loaded.path, prefer)
