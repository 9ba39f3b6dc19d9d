"""The path a streamed token takes to the client: accepted connections send without Nagle's
delay, the decode thread wakes the event loop once for many tokens, and a text chunk's
pre-encoded event is byte for byte the one `event` would build."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest
from serve_fixtures import serve_checkpoints  # noqa: F401  (a fixture, imported by name)

from lmforge.serve.generation import Mailbox
from lmforge.serve.server import ServerThread, bind
from lmforge.serve.sse import PieceEvents, event


def test_the_listening_socket_and_what_it_accepts_send_without_delay():
    listener = bind("127.0.0.1", 0)
    try:
        assert listener.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only on sockets that say so
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()


def test_a_live_streaming_connection_has_nagle_off(serve_checkpoints):
    from lmforge.serve.served import load_served
    from lmforge.serve.state import ServerState

    served = load_served(str(serve_checkpoints["gpt_run"]), "cpu", max_batch=2)
    body = {"prompt": "the king and the", "max_tokens": 4, "temperature": 0, "stream": True}
    thread = ServerThread(ServerState(models={"bot": served}, max_tokens=8))
    with thread as url, httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = list(r.iter_lines())
        connections = thread.server.server_state.connections  # uvicorn's open connections: this one
        sockets = [c.transport.get_extra_info("socket") for c in connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
    served.close()
    assert r.status_code == 200 and "data: [DONE]" in lines


class _CountingLoop:
    """A stand-in event loop that records what the decode thread schedules and runs it on demand."""

    def __init__(self) -> None:
        self.scheduled = []

    def call_soon_threadsafe(self, callback) -> None:
        self.scheduled.append(callback)


def test_the_mailbox_wakes_the_loop_once_for_the_tokens_posted_together():
    loop = _CountingLoop()
    box = Mailbox(loop)
    queues = [asyncio.Queue() for _ in range(16)]

    def decode_step(token: int) -> None:
        for q in queues:
            box.post(q, token)

    worker = threading.Thread(target=decode_step, args=(7,))
    worker.start()
    worker.join()
    assert len(loop.scheduled) == 1  # one wake-up for 16 rows
    loop.scheduled.pop()()
    assert [q.get_nowait() for q in queues] == [7] * 16
    decode_step(8)
    decode_step(9)  # a second step before the loop ran: still the one wake-up
    assert len(loop.scheduled) == 1
    loop.scheduled.pop()()
    assert all([q.get_nowait(), q.get_nowait()] == [8, 9] for q in queues)  # in order
    decode_step(10)
    assert len(loop.scheduled) == 1  # delivered, so the next post wakes the loop again


@pytest.mark.parametrize("text", ["plain", "quote \" and \\ backslash\n", "\x00\x1f controls", "中文 é 🙂", ""])
def test_a_pre_encoded_chunk_equals_the_event_built_whole(text):
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    make = PieceEvents({**chunk, "choices": [{"index": 0, "text": PieceEvents.TEXT, "logprobs": None,
                                              "finish_reason": None}]})
    assert make(text) == event({**chunk, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                      "finish_reason": None}]})


def test_a_chunk_without_the_text_field_is_refused():
    with pytest.raises(ValueError, match="TEXT"):
        PieceEvents({"choices": []})


class _Scheduler:
    """Takes the request and remembers a cancel; the test plays the decode thread."""

    def __init__(self) -> None:
        self.cancelled = []

    def submit(self, request) -> None:
        self.request = request

    def cancel(self, request) -> None:
        self.cancelled.append(request)


def _stream(stop: list[str]):
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lmforge.serve.generation import TextStream
    from lmforge.serve.params import GenerationParams

    words = ["a", "b", "c", "d"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.Fuse()  # ids spell "abcd..."
    served = SimpleNamespace(scheduler=_Scheduler(), loaded=SimpleNamespace(tokenizer=tok))
    params = GenerationParams(max_tokens=8, temperature=0.0, top_p=None, top_k=None, repetition_penalty=1.0,
                              presence_penalty=0.0, frequency_penalty=0.0, seed=None, stop=stop, stream=True,
                              include_usage=False, truncate=False)
    return TextStream(served, [0], params, 8, ()), served.scheduler


def _play(stop: list[str], steps: list[list[object]]) -> tuple[list[str], object, list]:
    """Run `pieces()` while the "decode thread" delivers each step's items at once: (the pieces,
    the stream, the cancelled requests); an error the stream raised is the stream's `error`."""
    async def main():
        stream, scheduler = _stream(stop)
        request = scheduler.request
        got = []

        async def feed():
            for items in steps:
                for item in items:
                    request.on_token(item) if isinstance(item, int) else request.on_finish(item)
                await asyncio.sleep(0.01)  # the mailbox delivers them in one turn of the loop

        from lmforge.serve.errors import APIError

        feeder = asyncio.ensure_future(feed())
        stream.error = None
        try:
            async for piece in stream.pieces():
                got.append(piece)
        except APIError as err:
            stream.error = err
        finally:
            await feeder
        return got, stream, scheduler.cancelled
    return asyncio.run(main())


def test_tokens_delivered_together_leave_as_one_piece():
    got, stream, cancelled = _play([], [[0, 1, 2], [3], ["length"]])
    assert got == ["abc", "d"]
    assert stream.finish_reason == "length" and stream.completion_tokens == 4 and not cancelled


def test_a_stop_string_inside_a_delivery_cuts_it_and_cancels_the_rest():
    got, stream, cancelled = _play(["bc"], [[0, 1, 2, 3], [0], ["length"]])
    assert got == ["a"]
    assert stream.finish_reason == "stop" and cancelled and stream.completion_tokens == 3  # "d" never counted


def test_text_before_an_error_is_sent_then_the_error():
    got, stream, _ = _play([], [[0, 1, "error: boom"]])
    assert got == ["ab"]
    assert stream.error.status == 500 and "generation failed: boom" in str(stream.error.body())
