"""Responses that notice a client going away: a server-sent event stream and a waited-for result.

Owns `EventStream` (an ASGI response sending `data: {...}` events, then `data: [DONE]`),
`PieceEvents` (a stream's text chunks, the unchanging part encoded once) and
`unless_disconnected` (await a result while watching the connection). Both call `on_gone` the
moment the client disconnects, so its request leaves the batch at the next decode step rather
than when the next token would have been sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


def event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


class PieceEvents:
    """`event(data)` for chunks that differ only in their text: `data` holds `PieceEvents.TEXT`
    where the text goes; everything around it is encoded once, each piece alone."""

    TEXT = "\x00text\x00"

    def __init__(self, data: dict) -> None:
        self.head, found, self.tail = event(data).partition(json.dumps(self.TEXT).encode())
        if not found:
            raise ValueError("PieceEvents: the chunk has no PieceEvents.TEXT field")

    def __call__(self, text: str) -> bytes:
        return self.head + json.dumps(text, ensure_ascii=False).encode() + self.tail


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """`text/event-stream` of the byte events `events` yields; `on_gone()` if the client leaves first."""

    def __init__(self, events: AsyncIterator[bytes], on_gone: Callable[[], None]) -> None:
        self.events = events
        self.on_gone = on_gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        watcher = asyncio.create_task(_disconnected(receive))
        watcher.add_done_callback(lambda task: task.cancelled() or self.on_gone())
        try:
            async for chunk in self.events:
                if watcher.done():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            self.on_gone()
        finally:
            watcher.cancel()
            await self.events.aclose()


async def unless_disconnected(request: Request, result: Awaitable[T], on_gone: Callable[[], None]) -> T | None:
    """`await result`, or None (after `on_gone()`) if the client disconnects first."""
    work = asyncio.ensure_future(result)
    watcher = asyncio.create_task(_disconnected(request.receive))
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        on_gone()
        work.cancel()
        return None
    finally:
        watcher.cancel()
