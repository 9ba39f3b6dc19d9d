"""Sixteen streaming clients at once get the greedy texts they get one at a time, decoded in
shared batches; a client that disconnects frees its row at once."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
from serve_fixtures import serve_checkpoints, server  # noqa: F401  (fixtures, imported by name: a conftest.py here would shadow tests/conftest.py)

PROMPTS = [f"{word} and the {other}" for word, other in zip(
    ["king", "queen", "lord", "lady", "duke", "night", "day", "love", "war", "peace", "sword", "crown", "heart",
     "blood", "fair", "death"],
    ["castle", "sea", "field", "sun", "moon", "star", "field", "tower", "gate", "wind", "rain", "fire", "stone",
     "tree", "hill", "road"])]


def _stream(url: str, prompt: str) -> tuple[str, str | None]:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        text, finish = "", None
        for chunk in client.chat.completions.create(model="bot", messages=[{"role": "user", "content": prompt}],
                                                    temperature=0, max_tokens=24, stream=True):
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish


def _slowed_without_stops(monkeypatch, scheduler, stop_ids, seconds: float) -> list[int]:
    """Make every decode step last `seconds` more and never pick a stop id, so a reply runs to its
    max_tokens unless it is cancelled; returns the list the steps' row counts are appended to."""
    step, steps = scheduler.decoder.step, []

    def slowed(tokens):
        steps.append(len(tokens))
        time.sleep(seconds)
        logits = step(tokens)
        logits[:, list(stop_ids)] = float("-inf")
        return logits

    monkeypatch.setattr(scheduler.decoder, "step", slowed)
    return steps


def test_sixteen_concurrent_streams_equal_one_at_a_time(server, monkeypatch):
    url, state = server
    scheduler = state.models["bot"].scheduler
    # every reply runs its 24 tokens, 2 ms a step at least: the clients overlap
    _slowed_without_stops(monkeypatch, scheduler, state.models["bot"].chat_stop_ids(), 0.002)
    alone = [_stream(url, p) for p in PROMPTS]
    scheduler.peak_batch = 0
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _stream(url, p), PROMPTS))
    assert together == alone
    # different answers, so a row mix-up would show (how many varies from session to session: the
    # WordPiece trainer numbers tied pieces in hash order, and the texts follow the ids)
    assert len({text for text, _ in alone}) >= 4
    assert scheduler.peak_batch >= 8  # they shared forward passes
    assert scheduler.busy == 0


def test_a_client_that_disconnects_frees_its_row(server, monkeypatch):
    url, state = server
    scheduler = state.models["bot"].scheduler
    _, stop_ids = state.models["bot"].completion_ids("the king")
    # 48 tokens now take about a second, long after the client has left, and the model cannot end the reply
    steps = _slowed_without_stops(monkeypatch, scheduler, stop_ids, 0.02)
    before = dict(scheduler.finished)
    body = {"model": "bot", "prompt": "the king", "max_tokens": 48, "temperature": 0, "stream": True,
            "stop": ["\u2603"]}  # a stop string that never comes: the reply runs to max_tokens unless cancelled
    with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
        assert scheduler.busy == 1
    left = time.monotonic()
    while scheduler.busy and time.monotonic() < left + 5:
        time.sleep(0.005)
    assert scheduler.busy == 0 and time.monotonic() - left < 0.5
    # cut short by the disconnect: cancelled, or ended by its receiver being gone, never run to its length
    ended = {k: scheduler.finished[k] - before.get(k, 0) for k in ("cancelled", "error", "length", "stop")}
    assert ended["cancelled"] + ended["error"] == 1 and not ended["length"] and not ended["stop"], ended
    assert 1 <= len(steps) < 47
    # and the server goes on
    assert httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
