"""Multi-turn chat with a dialogue model: the session and its streamed replies.

Owns the conversation: the history is a list of turns (text and the token ids they were
typed or generated as); the context for a reply is the last `max_history` turns (the new user
turn included, as GPT2-chitchat counts), after an optional system message, put into the
checkpoint's chat format (`lmforge.inference.chat_format`: its own chat template with the
generation prompt, or GPT2-chitchat's `[CLS] t1 [SEP] ... [SEP] user [SEP]`), with older whole
turns dropped until it fits the model context with room for the reply. The reply is streamed
by `lmforge.inference.generate.stream_generate`, stopping at the format's stop ids ([SEP], or
the template's end-of-turn token and the EOS).

To render a list of OpenAI-style messages without a session (a server, a batch job), use
`lmforge.inference.chat_format.chat_format_for(tokenizer, folder).prompt_ids(messages,
max_tokens)` and its `stop_ids`, as this session does.

Text the vocabulary does not know becomes [UNK]; nothing typed can crash a session (text
that is not valid UTF-8 is a ValueError the caller reports).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from torch import nn

from lmforge.data.dialogue_format import RESPONSE, USER
from lmforge.inference.chat_format import ChatFormat, ChitchatFormat
from lmforge.inference.generate import SamplingConfig, stream_generate

COMMANDS = "/reset  /history  /save FILE  /quit"
# Scripts written without spaces between words: no space is put next to these characters.
_NO_SPACE = re.compile("[\u2e80-\u2fff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                       "\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0002fa1f]")
_NO_SPACE_BEFORE = set(".,!?;:%)]}'\u2019")
_NO_SPACE_AFTER = set("([{$'\u2019")


@dataclass
class Turn:
    role: int  # USER or RESPONSE
    text: str
    ids: list[int]


class StreamDecoder:
    """Token ids -> text pieces, one call per token, so a reply can be printed as it comes.

    WordPiece: tokens are joined by rule ("##" glued, no space around CJK characters or
    before punctuation), which never rewrites text already printed. Byte-level BPE (and
    SentencePiece-style decoders): a piece is given out once its characters are complete. Only
    the tokens since the last piece are decoded, after one token of context (`_window`), so a
    token costs the same at the end of a long reply as at its start.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.wordpiece = isinstance(tokenizer.model, models.WordPiece)
        self.special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.ids: list[int] = []
        self.text = ""
        self._window = 0  # ids[_window:_read]: the context the next piece is decoded after
        self._read = 0  # ids[:_read] are in self.text

    def push(self, token_id: int) -> str:
        if token_id in self.special:
            return ""
        if self.wordpiece:
            piece = _join_wordpiece(self.text, self.tokenizer.id_to_token(token_id) or "")
            self.text += piece
            return piece
        self.ids.append(token_id)
        # the context decoded alone and with the new tokens: the difference is what they add (a decoder
        # that drops the first token's leading space drops it from the context only)
        before = self.tokenizer.decode(self.ids[self._window:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._window:], skip_special_tokens=True)
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # a multi-byte character still incomplete
        piece = after[len(before):]
        self.text += piece
        if piece:
            self._window, self._read = self._read, len(self.ids)
        return piece


def _join_wordpiece(before: str, token: str) -> str:
    if token.startswith("##"):
        return token[2:]
    if not before or not token:
        return token
    prev, first = before[-1], token[0]
    if (_NO_SPACE.match(prev) or _NO_SPACE.match(first) or first in _NO_SPACE_BEFORE
            or prev in _NO_SPACE_AFTER):
        return token
    return " " + token


def decode_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(i) for i in ids)


class ChatSession:
    """A conversation with a dialogue model; `reply(text)` streams the model's answer.

    `chat_format`: how turns become a prompt (default: the chitchat format of the tokenizer);
    `system`: a system message put before the turns (the template format renders it as the
    template does; the chitchat format as a first user turn)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, sampling: SamplingConfig, *,
                 max_history: int = 3, generator: torch.Generator | None = None,
                 chat_format: ChatFormat | None = None, system: str | None = None) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1 (the new turn itself), got {max_history}")
        self.model = model
        self.tokenizer = tokenizer
        self.format = chat_format if chat_format is not None else ChitchatFormat(tokenizer)
        stops = tuple(dict.fromkeys((*sampling.stop_ids, *self.format.stop_ids)))
        self.sampling = dataclasses.replace(sampling, stop_ids=stops)
        self.max_history = max_history
        self.generator = generator
        self.system = system.strip() if system and system.strip() else None
        self.history: list[Turn] = []
        self.transcript: list[Turn | None] = []  # every turn since the start; None marks a /reset

    def encode(self, text: str) -> list[int]:
        """The turn's token ids (special-token text typed is plain text); text that leaves no token
        (control characters) becomes [UNK].

        Text that is not valid Unicode (lone surrogates: bytes that were not UTF-8) is a ValueError."""
        return self.format.encode(text)

    def messages(self, user_text: str | None = None) -> list[dict]:
        """The conversation the next reply sees: the system message, then the last max_history
        turns (with `user_text` as the newest), as OpenAI-style messages with their token ids."""
        turns = [{"role": "user" if t.role == USER else "assistant", "content": t.text, "token_ids": t.ids}
                 for t in self.history]
        if user_text is not None:
            turns.append({"role": "user", "content": user_text, "token_ids": self.encode(user_text)})
        turns = turns[-self.max_history:]
        while self.format.name == "template" and turns and turns[0]["role"] != "user":
            turns = turns[1:]  # a template may insist on the user first (Llama 2's does)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + turns

    def context_ids(self, user_text: str | None = None) -> list[int]:
        """The prompt for the next reply: the last max_history turns (with `user_text` as the newest),
        cut to the model context with room for the reply."""
        messages = self.messages(user_text)
        if not messages:
            return []
        context = self.model.config.context
        room = min(self.sampling.max_new_tokens, context // 2)  # for the reply
        return self.format.prompt_ids(messages, max(3, context - room))

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's turn, stream the reply as text pieces, and add the reply to the history.

        Stopped early (Ctrl-C, or the iterator closed), the reply so far still joins the history.
        """
        text = text.strip()
        user = Turn(USER, text, self.encode(text))
        if not user.ids:
            return
        prompt = self.context_ids(text)
        self._add(user)
        decoder = StreamDecoder(self.tokenizer)
        new: list[int] = []
        try:
            for token in stream_generate(self.model, prompt, self.sampling, generator=self.generator):
                new.append(token)
                piece = decoder.push(token)
                if piece:
                    yield piece
        finally:
            if new:
                self._add(Turn(RESPONSE, decoder.text, new))

    def _add(self, turn: Turn) -> None:
        self.history.append(turn)
        self.transcript.append(turn)

    def reset(self) -> None:
        self.history = []
        if self.transcript and self.transcript[-1] is not None:
            self.transcript.append(None)

    def save(self, path: Path) -> Path:
        """Write the transcript: `.jsonl` as {"messages": [...]} per conversation, else plain text."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conversations: list[list[Turn]] = [[]]
        for turn in self.transcript:
            if turn is None:
                conversations.append([])
            else:
                conversations[-1].append(turn)
        conversations = [c for c in conversations if c]
        if path.suffix.lower() == ".jsonl":
            lines = [json.dumps({"messages": [{"role": "user" if t.role == USER else "assistant",
                                               "content": t.text} for t in c]}, ensure_ascii=False)
                     for c in conversations]
            text = "".join(line + "\n" for line in lines)
        else:
            text = "\n".join("".join(f"{speaker_name(t)}: {t.text}\n" for t in c) for c in conversations)
        path.write_text(text, encoding="utf-8")
        return path


def speaker_name(turn: Turn) -> str:
    return "you" if turn.role == USER else "bot"
