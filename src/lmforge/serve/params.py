"""Reading a request body and checking its fields, each error naming the field (OpenAI's `param`).

Owns `read_json` (the body, within the size limit, as a JSON object), `Fields` (typed access
to its fields; an argument the endpoint does not know is refused, as OpenAI does) and
`GenerationParams`, the sampling fields chat and completions share.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from starlette.requests import Request

from lmforge.serve.errors import APIError, bad_request

MAX_BODY_BYTES = 4 * 2**20
_MISSING = object()
# Fields the server does not implement, with the values that ask for nothing (accepted).
_UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (None, 0), "echo": (False,), "logit_bias": ({},),
                "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},), "suffix": ("",)}
# Fields clients send that change nothing here (n and logprobs are checked for what we support).
_HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> dict:
    """The body as a JSON object; 413 past `limit` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; the limit is {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise bad_request(f"the request body is not valid JSON: {err.msg} at line {err.lineno} column "
                          f"{err.colno}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


class Fields:
    """Typed, checked access to a body's fields; `done()` refuses any field nobody asked for."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.seen: set[str] = set(_HARMLESS)

    def raw(self, name: str, default: object = None) -> object:
        self.seen.add(name)
        value = self.body.get(name, default)
        return default if value is None else value

    def required(self, name: str) -> object:
        self.seen.add(name)
        if self.body.get(name) is None:
            raise bad_request(f"'{name}' is required", param=name, code="missing_required_parameter")
        return self.body[name]

    def _typed(self, name: str, default: object, fits, what: str) -> object:
        value = self.raw(name, _MISSING)
        if value is _MISSING:
            return default
        if not fits(value):
            raise bad_request(f"'{name}' must be {what}, got {json.dumps(value)[:60]}", param=name)
        return value

    def integer(self, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        value = self._typed(name, _MISSING, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
        if value is _MISSING:
            return default
        _check_range(name, value, low, high)
        return value

    def number(self, name: str, default: float | None, low: float | None = None, high: float | None = None,
               above: float | None = None) -> float | None:
        value = self._typed(name, _MISSING, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                            and math.isfinite(v), "a finite number")
        if value is _MISSING:
            return default
        if above is not None and not value > above:
            raise bad_request(f"'{name}' must be greater than {above}, got {value}", param=name)
        _check_range(name, value, low, high)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return self._typed(name, default, lambda v: isinstance(v, bool), "true or false")

    def string(self, name: str, default: str | None) -> str | None:
        return self._typed(name, default, lambda v: isinstance(v, str), "a string")

    def done(self) -> None:
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0],
                              code="unknown_parameter")


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if low is not None and high is not None else \
            (f">= {low}" if low is not None else f"<= {high}")
        raise bad_request(f"'{name}' must be {bounds}, got {value}", param=name)


@dataclass(kw_only=True)
class GenerationParams:
    """The sampling fields of chat and completion requests (OpenAI's, and top_k /
    repetition_penalty / truncate as extensions)."""

    max_tokens: int | None
    temperature: float
    top_p: float | None
    top_k: int | None
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    truncate: bool
    """Cut the prompt from the left (whole turns for chat) to fit the context, instead of a 400."""


def generation_params(f: Fields) -> GenerationParams:
    """The sampling fields of a chat or completion body (each checked, each error naming it)."""
    if f.integer("n", 1, 1) != 1:
        raise bad_request("'n' must be 1: one choice per request (send several requests; they are batched)",
                          param="n")
    for name, fine in _UNSUPPORTED.items():
        if f.raw(name, fine[0]) not in fine:
            raise bad_request(f"'{name}' is not supported by this server (leave it out)", param=name)
    max_tokens = f.integer("max_completion_tokens", None, 1)
    max_tokens = f.integer("max_tokens", max_tokens, 1)
    stop = f.raw("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    options = f.raw("stream_options", {})
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request("'stream_options' must be an object like {\"include_usage\": true}",
                          param="stream_options")
    return GenerationParams(
        max_tokens=max_tokens, temperature=f.number("temperature", 1.0, 0.0, 100.0),
        top_p=f.number("top_p", None, high=1.0, above=0.0), top_k=f.integer("top_k", None, 1),
        repetition_penalty=f.number("repetition_penalty", 1.0, high=100.0, above=0.0),
        presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
        seed=f.integer("seed", None, 0, 2**63 - 1), stop=stop, stream=f.boolean("stream", False),
        include_usage=bool(options.get("include_usage", False)), truncate=f.boolean("truncate", False))
