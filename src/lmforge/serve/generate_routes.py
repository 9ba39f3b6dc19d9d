"""`POST /v1/chat/completions` and `POST /v1/completions`: requests in, OpenAI-shaped answers out.

Each handler reads and checks its body (`params`), builds the prompt in the model's format
(`served`), fits it to the context (`generation.fit_prompt`) and runs it on the batching
scheduler: as one JSON answer, or with `stream: true` as server-sent `chat.completion.chunk` /
`text_completion` events ending in `data: [DONE]` (with a usage event first when
`stream_options.include_usage` asks).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse

from lmforge.inference.checks import check_text
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.generation import TextStream, fit_prompt
from lmforge.serve.params import Fields, GenerationParams, generation_params
from lmforge.serve.served import ServedModel
from lmforge.serve.sse import DONE, EventStream, PieceEvents, event, unless_disconnected
from lmforge.serve.state import ServerState

ROLES = ("system", "developer", "user", "assistant")


def _messages(value: object) -> list[dict]:
    """OpenAI messages -> {"role", "content"} with text content (a list of text parts is joined)."""
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(f"{where}: must be an object with a 'role' of {', '.join(ROLES)}", param=where)
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content: must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                              "parts", param=f"{where}.content")
        try:
            check_text(content, f"{where}.content")
        except ValueError as err:
            raise bad_request(str(err), param=f"{where}.content") from None
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
    return out


def _prompt(value: object) -> str | list[int]:
    """A completion prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        try:
            return check_text(value, "prompt")
        except ValueError as err:
            raise bad_request(str(err), param="prompt") from None
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return value
    raise bad_request("'prompt' must be a string (or a list of one string, or of token ids); send one request "
                      "per prompt: they are batched", param="prompt")


def _start(state: ServerState, served: ServedModel, build, params: GenerationParams,
           stop_ids: tuple[int, ...], param: str) -> TextStream:
    ids, max_tokens = fit_prompt(build, served.context, params, state.max_tokens, param)
    vocab = served.loaded.model.config.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise bad_request(f"the prompt holds token ids outside the vocabulary (0 to {vocab - 1})", param="prompt")
    try:
        return TextStream(served, ids, params, max_tokens, stop_ids)
    except RuntimeError as err:  # shutting down
        raise APIError(503, str(err), code="server_shutting_down") from None


async def chat_completions(request: Request, state: ServerState) -> object:
    f = Fields(await state.read_body(request))
    served = state.model_for(f, "chat")
    messages = _messages(f.required("messages"))
    params = generation_params(f)
    f.done()
    stream = _start(state, served, lambda max_len: served.chat_ids(messages, max_len), params,
                    served.chat_stop_ids(), "messages")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    if params.stream:
        return EventStream(_chat_events(stream, head, params.include_usage), stream.cancel)
    text = await unless_disconnected(request, stream.collect(), stream.cancel)
    return JSONResponse({**head, "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
        "finish_reason": stream.finish_reason}], "usage": stream.usage()})


async def _chat_events(stream: TextStream, head: dict, include_usage: bool) -> AsyncIterator[bytes]:
    chunk = {**head, "object": "chat.completion.chunk"}

    def choice(delta: dict, finish: str | None) -> bytes:
        return event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield choice({"role": "assistant", "content": ""}, None)
    content = PieceEvents({**chunk, "choices": [{"index": 0, "delta": {"content": PieceEvents.TEXT}, "logprobs": None,
                                                 "finish_reason": None}]})
    try:
        async for piece in stream.pieces():
            yield content(piece)
    except APIError as err:
        yield event(err.body())
        yield DONE
        return
    yield choice({}, stream.finish_reason)
    if include_usage:
        yield event({**chunk, "choices": [], "usage": stream.usage()})
    yield DONE


async def completions(request: Request, state: ServerState) -> object:
    f = Fields(await state.read_body(request))
    served = state.model_for(f, "completions")
    prompt = _prompt(f.required("prompt"))
    params = generation_params(f)
    f.done()
    ids, stop_ids = served.completion_ids(prompt)
    stream = _start(state, served, lambda max_len: ids if max_len is None else ids[-max_len:], params, stop_ids,
                    "prompt")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    if params.stream:
        return EventStream(_completion_events(stream, head, params.include_usage), stream.cancel)
    text = await unless_disconnected(request, stream.collect(), stream.cancel)
    return JSONResponse({**head, "object": "text_completion", "choices": [{
        "index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason}],
        "usage": stream.usage()})


async def _completion_events(stream: TextStream, head: dict, include_usage: bool) -> AsyncIterator[bytes]:
    chunk = {**head, "object": "text_completion"}
    text = PieceEvents({**chunk, "choices": [{"index": 0, "text": PieceEvents.TEXT, "logprobs": None,
                                              "finish_reason": None}]})
    try:
        async for piece in stream.pieces():
            yield text(piece)
    except APIError as err:
        yield event(err.body())
        yield DONE
        return
    yield event({**chunk, "choices": [{"index": 0, "text": "", "logprobs": None,
                                       "finish_reason": stream.finish_reason}]})
    if include_usage:
        yield event({**chunk, "choices": [], "usage": stream.usage()})
    yield DONE
