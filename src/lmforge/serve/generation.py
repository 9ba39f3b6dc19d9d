"""One chat or completion request on the batching scheduler, as text.

Owns `fit_prompt` (the prompt and the number of new tokens, checked against the context and
the server's limit, or the prompt cut to fit when the request asks), `StopStrings` (text held
back while it may be the start of a stop string) and `TextStream`: the request's text pieces
as an async iterator, then its finish reason and token counts.

The scheduler runs on its own thread; its callbacks post tokens to the loop's `Mailbox`, which
wakes the event loop once for all the tokens of a decode step (not once per row), so
detokenizing and sending happen on the server's loop.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lmforge.inference.chat_session import StreamDecoder
from lmforge.inference.generate import SamplingConfig
from lmforge.inference.scheduler import GenerationRequest
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.params import GenerationParams
from lmforge.serve.served import ServedModel

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


def fit_prompt(build: Callable[[int | None], list[int]], context: int, params: GenerationParams,
               server_max: int, param: str) -> tuple[list[int], int]:
    """(prompt ids, max new tokens). `build(max_len)` gives the prompt cut to max_len (None: whole);
    `param` names the prompt's field in errors.

    Without `max_tokens` a reply may fill the rest of the context (up to `server_max`); a prompt
    that leaves no room is a 400 (`context_length_exceeded`) unless the request asks to truncate.
    """
    asked = params.max_tokens
    if asked is not None and asked > server_max:
        raise bad_request(f"'max_tokens' is {asked}; this server allows at most {server_max} (its --max-tokens)",
                          param="max_tokens")
    ids = build(None)
    room = context - len(ids)
    wanted = asked if asked is not None else min(server_max, room)
    if wanted >= 1 and len(ids) + wanted <= context:
        return ids, wanted
    if not params.truncate:
        raise bad_request(f"the prompt is {len(ids)} tokens and {asked if asked is not None else 'at least 1'} "
                          f"new token(s) were asked; the model's context is {context} tokens. Shorten the prompt, "
                          "lower max_tokens, or send \"truncate\": true to drop the oldest tokens",
                          param=param, code="context_length_exceeded")
    wanted = asked if asked is not None else min(server_max, context // 2)
    if wanted >= context:
        raise bad_request(f"'max_tokens' is {wanted}; the model's context is {context} tokens",
                          param="max_tokens", code="context_length_exceeded")
    ids = build(context - wanted)
    return ids, min(wanted, context - len(ids))


class StopStrings:
    """Cuts text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that can be sent now, whether a stop string was reached)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((n for s in self.stops for n in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


@dataclass
class _Finished:
    reason: str


class Mailbox:
    """Items from the decode thread into asyncio queues of one event loop. The first item posted
    after a delivery schedules the next delivery; the rest of the step's items ride along, so the
    loop is woken (a write to its self-pipe, a turn of the loop) once a step, whatever the rows."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, object]] = []
        self.lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item: object) -> None:
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:  # a delivery is already scheduled
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox_of(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (made on first use; the event loop runs it, so no lock is needed here)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class TextStream:
    """A generation request's text: iterate `pieces()`; then `finish_reason` and `usage()`."""

    def __init__(self, served: ServedModel, prompt_ids: list[int], params: GenerationParams, max_tokens: int,
                 stop_ids: tuple[int, ...]) -> None:
        box = mailbox_of(asyncio.get_running_loop())
        self.queue: asyncio.Queue = asyncio.Queue()
        queue = self.queue
        try:
            sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=params.temperature, top_k=params.top_k,
                                      top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                                      stop_ids=stop_ids, seed=params.seed)
        except ValueError as err:
            raise bad_request(str(err)) from None
        self.request = GenerationRequest(
            prompt_ids, sampling, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            on_token=lambda token: box.post(queue, token),
            on_finish=lambda reason: box.post(queue, _Finished(reason)))
        self.scheduler = served.scheduler
        self.text = StreamDecoder(served.loaded.tokenizer)
        self.stops = StopStrings(params.stop)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.scheduler.submit(self.request)

    def cancel(self) -> None:
        """Free the request's row at the next step (the client went away, or a stop string came)."""
        self.scheduler.cancel(self.request)

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text as it comes. The tokens that arrived together make one piece, so a loop
        that falls behind the decoder sends fewer, larger events rather than lagging further."""
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            end = items.pop() if isinstance(items[-1], _Finished) else None  # always the request's last item
            text, stopped = self._push(items)
            if stopped:
                if text:
                    yield text
                self.finish_reason = "stop"
                self.cancel()
                return
            if end is None or end.reason.startswith("error"):
                if text:
                    yield text
                if end is None:
                    continue
                raise APIError(500, f"generation failed: {end.reason[len('error: '):]}", code="server_error")
            tail, stopped = self.stops.feed(self._undecoded())
            text += tail + ("" if stopped else self.stops.flush())
            if text:
                yield text
            self.finish_reason = "stop" if stopped else FINISH_REASONS[end.reason]
            return

    def _push(self, tokens: list[int]) -> tuple[str, bool]:
        """(the text `tokens` add that can be sent now, whether a stop string came in it); the
        tokens after a stop string are not counted (the client never sees them)."""
        sent = []
        for token in tokens:
            self.completion_tokens += 1
            text, stopped = self.stops.feed(self.text.push(token))
            sent.append(text)
            if stopped:
                return "".join(sent), True
        return "".join(sent), False

    def _undecoded(self) -> str:
        """What the last tokens spell that the streaming decoder held back (an incomplete character:
        the reply ended there), as the tokenizer decodes the whole reply."""
        d = self.text
        if d.wordpiece:
            return ""
        final = d.tokenizer.decode(d.ids, skip_special_tokens=True)
        return final[len(d.text):] if final.startswith(d.text) else ""

    async def collect(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}
