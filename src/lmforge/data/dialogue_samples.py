"""How a dialogue becomes one stored sample (token ids + per-token roles), in either format.

- `ChitchatSamples`: GPT2-chitchat's `[CLS] u1 [SEP] u2 [SEP] ...` (`lmforge.data.dialogue_format`),
  the format of models trained from scratch; special-token text typed in a turn is plain text.
- `TemplateSamples`: the tokenizer's own chat template (`lmforge.data.chat_template`), for an
  imported model that has one; role 1 on the tokens of the assistant's turns and the
  end-of-turn token that closes each, 0 on the template's text and the other turns. With
  `max_len`, the oldest turns after any system message are dropped (whole exchanges, so the
  conversation still starts with the user) until the rendering fits; one exchange that alone
  does not fit is cut at max_len.

`chat_template_of` decides which applies (`--chat-format auto|template|chitchat`); each class
gives `samples(batch)` (one `Sample` or None per dialogue: None when no turn has a token) and
`meta()`, the format's keys for meta.json's "dialogue" section.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer

from lmforge.base.tokenizer_config import tokenizer_settings
from lmforge.data.chat_template import ChatTemplate, roles_from_spans
from lmforge.data.dialogue_format import build_sample

CHAT_FORMATS = ("auto", "template", "chitchat")
TEMPLATE_FORMAT = "chat_template"


class Sample(NamedTuple):
    ids: list[int]
    roles: list[int]
    turns: int
    truncated: bool


def chat_template_of(tokenizer_path: Path, chat_format: str = "auto") -> ChatTemplate | None:
    """The tokenizer folder's chat template when the format is (or, for "auto", can be) the
    template one; None for the chitchat format."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    if chat_format == "chitchat":
        return None
    settings = tokenizer_settings(tokenizer_path)
    if settings.chat_template is None:
        if chat_format == "template":
            raise ValueError(f"{tokenizer_path}: no chat template (no chat_template in tokenizer_config.json, "
                             f"no chat_template.jinja); use --chat-format chitchat or a model folder that has one")
        return None
    return ChatTemplate(settings.chat_template, settings.tokens, settings.template_source or str(tokenizer_path))


class ChitchatSamples:
    """`[CLS] u1 [SEP] u2 [SEP] ...` samples, the turns encoded in one batch call."""

    def __init__(self, tok: Tokenizer, cls: int, sep: int, max_len: int | None) -> None:
        tok.encode_special_tokens = True  # "[SEP]" typed in a turn is text, not a turn boundary
        self.tok, self.cls, self.sep, self.max_len = tok, cls, sep, max_len

    def samples(self, batch: Sequence) -> list[Sample | None]:
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        encoded = iter(encode([t for d in batch for t in d.turns], add_special_tokens=False))
        out: list[Sample | None] = []
        for dialogue in batch:
            # roles first: zip then takes exactly len(roles) encodings, no more
            kept = [(e.ids, r) for r, e in zip(dialogue.roles, encoded) if e.ids]
            if not kept:
                out.append(None)
                continue
            turns, roles = [t for t, _ in kept], [r for _, r in kept]
            ids, token_roles = build_sample(turns, roles, self.cls, self.sep, self.max_len)
            out.append(Sample(ids, token_roles, len(turns), len(ids) < sum(len(t) + 1 for t in turns) + 1))
        return out

    def meta(self) -> dict:
        return {"format": "[CLS] u1 [SEP] u2 [SEP] ...; turns end at the sep id",
                "roles": {"0": "user ([CLS], user turns and their [SEP])",
                          "1": "response (reply turns and their [SEP])"},
                "cls_id": self.cls, "sep_id": self.sep}


class TemplateSamples:
    """Samples rendered with the chat template; roles from the assistant's spans."""

    def __init__(self, tok: Tokenizer, template: ChatTemplate, max_len: int | None) -> None:
        tok.encode_special_tokens = False  # the template's own control tokens must be parsed as such
        self.tok, self.template, self.max_len = tok, template, max_len

    def samples(self, batch: Sequence) -> list[Sample | None]:
        rendered = []
        for dialogue in batch:
            try:
                rendered.append(self.template.assistant_spans(dialogue.messages()) if dialogue.turns else None)
            except ValueError as err:
                raise ValueError(f"{dialogue.path}: line {dialogue.line}: {err}") from None
        texts = [r[0] for r in rendered if r is not None]
        encodings = iter(self.tok.encode_batch(texts, add_special_tokens=False) if texts else [])
        out: list[Sample | None] = []
        for dialogue, render in zip(batch, rendered):
            if render is None:
                out.append(None)
                continue
            encoding = next(encodings)
            ids, roles = encoding.ids, roles_from_spans(encoding.offsets, render[1])
            truncated = False
            if self.max_len is not None and len(ids) > self.max_len:
                ids, roles = self._fit(dialogue)
                truncated = True
            out.append(Sample(ids, roles, len(dialogue.turns), truncated))
        return out

    def _fit(self, dialogue) -> tuple[list[int], list[int]]:
        """The most recent whole exchanges that fit max_len (system messages kept), else the last
        exchange cut at max_len."""
        messages = dialogue.messages()
        system = messages[:1] if messages[0]["role"] == "system" else []
        rest = messages[len(system):]
        while True:
            starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
            if not starts:
                break
            rest = rest[starts[0]:]
            try:
                ids, roles = self.template.encode_with_roles(self.tok, system + rest)
            except ValueError as err:
                raise ValueError(f"{dialogue.path}: line {dialogue.line}: {err}") from None
            if len(ids) <= self.max_len:
                return ids, roles
        ids, roles = self.template.encode_with_roles(self.tok, system + rest)
        return ids[:self.max_len], roles[:self.max_len]

    def meta(self) -> dict:
        return {"format": TEMPLATE_FORMAT,
                "template_sha256": hashlib.sha256(self.template.source.encode("utf-8")).hexdigest(),
                "template_source": self.template.where,
                "roles": {"0": "the template's text, system, user and tool turns",
                          "1": "the assistant's turns, each with its end-of-turn token"},
                "cls_id": None, "sep_id": None}
