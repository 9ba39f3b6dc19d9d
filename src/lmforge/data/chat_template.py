"""Chat templates: a tokenizer's Jinja template rendered as transformers renders it, and the
token spans of the assistant's turns found in the result.

`ChatTemplate(source, tokens)` compiles the template in jinja2's immutable sandbox with the
settings transformers uses for `apply_chat_template`: `trim_blocks` and `lstrip_blocks`,
`raise_exception(message)`, `strftime_now(format)`, a `tojson` filter that keeps non-ASCII
text, loop controls (`break` / `continue`) and the `{% generation %}` tag. `render` sees
`messages`, `add_generation_prompt` and the named special tokens (`bos_token`, `eos_token`, ...)
from tokenizer_config.json, so `render(messages)` is `apply_chat_template(messages,
tokenize=False)` and `encode` is its `tokenize=True` (the rendered text encoded without added
BOS/EOS: the template writes them).

`assistant_spans` says which characters of the rendering are the assistant's turns:

- a template with `{% generation %}` blocks marks them itself;
- otherwise the conversation is rendered prefix by prefix: an assistant turn i starts where
  `messages[:i]` rendered with the generation prompt ends, and ends where `messages[:i+1]`
  ends (trailing whitespace after the end-of-turn token left out). Each prefix must be the
  start of the whole rendering; a template that renders earlier turns differently once later
  ones follow is refused, naming the message.

`encode_sanitized` is `encode` for text a user typed: a control token written inside a message
("<|im_end|>") is encoded as plain text, so only the template can end a turn (what
`apply_chat_template(..., sanitize_control_tokens=True)` gives; chat prompts use it).

`encode_with_roles` turns that into token ids and a per-token role (1 on every token that
overlaps an assistant span, 0 elsewhere), the store's `roles` format. `end_of_turn_ids`
finds the tokens a reply ends with (what follows the assistant's text in a rendered exchange).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPANS: ContextVar[list | None] = ContextVar("lmforge_generation_spans", default=None)


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body, and records its character span
    when a render asks for spans (the collected output so far gives the start)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        text = caller()
        tracking = _SPANS.get()
        if tracking is not None:
            pieces, spans = tracking
            start = sum(len(p) for p in pieces)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names: no way to CPython internals through it."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _dict
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template with the special tokens it may use."""

    def __init__(self, source: str, tokens: Mapping[str, str] | None = None, where: str = "chat template") -> None:
        self.source = source
        self.where = where
        self.tokens = dict(tokens or {})
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ValueError(f"{where}: not a valid Jinja template (line {err.lineno}: {err.message})") from None
        self.has_generation_blocks = bool(_GENERATION_TAG.search(source))

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)`."""
        return self._render(messages, add_generation_prompt, None)

    def _render(self, messages, add_generation_prompt: bool, spans: list | None) -> str:
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.tokens, "messages": plain, "add_generation_prompt": add_generation_prompt,
                     "tools": None, "documents": None}
        try:
            if spans is None:
                return self._template.render(**variables)
            pieces: list[str] = []
            reset = _SPANS.set((pieces, spans))
            try:
                for piece in self._template.generate(**variables):
                    pieces.append(piece)
            finally:
                _SPANS.reset(reset)
            return "".join(pieces)
        except jinja2.exceptions.TemplateError as err:  # raise_exception(...), an undefined call, the sandbox
            raise ValueError(f"{self.where}: the template refused this conversation: {err}") from None

    def encode(self, tok: Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendering, as `apply_chat_template(tokenize=True)` gives them."""
        return tok.encode(self.render(messages, add_generation_prompt), add_special_tokens=False).ids

    def encode_sanitized(self, tok: Tokenizer, messages: Sequence[Mapping],
                         add_generation_prompt: bool = False) -> list[int]:
        """`encode`, except that control tokens typed inside the messages ("<|im_end|>" in a user's
        text) are encoded as the plain text they are: only the template writes control tokens.
        Control tokens are the special added tokens and the added tokens the template's source
        contains (`apply_chat_template(..., sanitize_control_tokens=True)` decides the same way)."""
        controls = sorted(_control_tokens(tok, self.source), key=len, reverse=True)
        if not controls:
            return self.encode(tok, messages, add_generation_prompt)
        found = re.compile("|".join(map(re.escape, controls)))
        marked = [{k: found.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, v.replace(_MARK_START, "")
                                .replace(_MARK_END, "")) if isinstance(v, str) else v for k, v in m.items()}
                  for m in messages]
        pieces = re.split(f"{_MARK_START}(.*?){_MARK_END}|[{_MARK_START}{_MARK_END}]",
                          self.render(marked, add_generation_prompt), flags=re.S)
        ids = tok.encode(pieces[0], add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], 1):
            if piece:
                ids += _encode_inner(tok, piece, as_text=i % 2 == 1)
        return ids

    def assistant_spans(self, messages: Sequence[Mapping]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendering, the [start, end) character spans of the assistant turns in it)."""
        if self.has_generation_blocks:
            spans: list[tuple[int, int]] = []
            return self._render(messages, False, spans), spans
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = len(self._prefix(messages[:i], True, full, i))
            end_text = self._prefix(messages[:i + 1], False, full, i)
            end = len(end_text.rstrip())
            if end > start:
                spans.append((start, end))
        return full, spans

    def _prefix(self, messages, add_generation_prompt: bool, full: str, index: int) -> str:
        text = self.render(messages, add_generation_prompt)
        if not full.startswith(text):
            raise ValueError(f"{self.where}: cannot find the assistant's turn in messages[{index}]: the template "
                             f"renders the conversation up to there differently from the whole (it rewrites "
                             f"earlier turns once later ones follow); add {{% generation %}} blocks around the "
                             f"assistant's text, or prepare with --chat-format chitchat")
        return text

    def encode_with_roles(self, tok: Tokenizer, messages: Sequence[Mapping]) -> tuple[list[int], list[int]]:
        """(token ids of the rendering, per-token roles: 1 on the assistant's turns, 0 elsewhere)."""
        text, spans = self.assistant_spans(messages)
        encoding = tok.encode(text, add_special_tokens=False)
        return encoding.ids, roles_from_spans(encoding.offsets, spans)

    def end_of_turn_ids(self, tok: Tokenizer) -> list[int]:
        """The added tokens that follow the assistant's text when a turn is rendered (Qwen2's
        <|im_end|>, Llama 3's <|eot_id|>, Llama 2's </s>): where a reply stops."""
        marker = "lmforge-reply-marker"
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        except ValueError:
            return []
        after = text[text.rfind(marker) + len(marker):] if marker in text else ""
        added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        ids = tok.encode(after, add_special_tokens=False).ids if after.strip() else []
        return [i for i in ids if tok.id_to_token(i) in added][:1]


_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # private-use characters: no text has them


def _control_tokens(tok: Tokenizer, source: str) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values()
            if t.special or (t.content in source and not t.content.isspace())]


def _plain_ids(tok: Tokenizer, text: str) -> list[int]:
    """`text` through the tokenizer's normalizer, pre-tokenizer and model alone: added tokens are
    not looked for, so a control token's text becomes ordinary tokens."""
    if tok.normalizer is not None:
        text = tok.normalizer.normalize_str(text)
    words = [text]
    if tok.pre_tokenizer is not None:
        words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    return [t.id for w in words for t in tok.model.tokenize(w)]


def _encode_inner(tok: Tokenizer, piece: str, as_text: bool) -> list[int]:
    """A piece from inside a rendering. A sentencepiece-style tokenizer would mark a string's start
    with "▁", so the piece is encoded after a newline whose ids are then taken off."""
    encode = (lambda t: _plain_ids(tok, t)) if as_text else (lambda t: tok.encode(t, add_special_tokens=False).ids)
    newline = encode("\n")
    ids = encode("\n" + piece)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode(piece)


def roles_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span, else 0 (spans and offsets in order)."""
    roles = [0] * len(offsets)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0] and b > a:
            roles[t] = 1
    return roles
