"""The API through the official `openai` client: every endpoint, answers equal to lmforge's own
single-request generation, streamed text equal to the whole answer, usage counts, stop strings."""

from __future__ import annotations

import contextlib
import time

import httpx
import numpy as np
import openai
import pytest

from lmforge.inference.chat_session import decode_text
from lmforge.inference.classifier import class_probabilities
from lmforge.inference.embedder import embed
from lmforge.inference.generate import SamplingConfig, generate
from serve_fixtures import serve_checkpoints, server  # noqa: F401  (fixtures, imported by name: a conftest.py here would shadow tests/conftest.py)

MESSAGES = [{"role": "user", "content": "good morning, my lord"},
            {"role": "assistant", "content": "what news?"},
            {"role": "user", "content": "the king is coming to the castle"}]


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def _alone(state, name: str, prompt: list[int], stop: tuple[int, ...], n: int) -> tuple[str, int]:
    """The greedy answer lmforge's single-request generation gives, and its token count."""
    served = state.models[name]
    tokens = generate(served.loaded.model, prompt, SamplingConfig(max_new_tokens=n, temperature=0, stop_ids=stop))
    return decode_text(served.loaded.tokenizer, tokens), len(tokens)


def test_models_are_listed(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"bot", "bert", "clf"}
    assert client.models.retrieve("bot").id == "bot"


def test_chat_completion_equals_single_generation_and_streams_the_same_text(client, server):
    _, state = server
    bot = state.models["bot"]
    prompt = bot.chat_ids(MESSAGES, None)
    want, n = _alone(state, "bot", prompt, bot.chat_stop_ids(), 30)
    answer = client.chat.completions.create(model="bot", messages=MESSAGES, temperature=0, max_tokens=30)
    assert answer.choices[0].message.content == want and want
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == ("length" if n == 30 else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), n)
    assert answer.usage.total_tokens == len(prompt) + n
    with _slower_steps(bot.scheduler):  # tokens a step apart: the loop sends each step's before the next
        chunks = list(client.chat.completions.create(model="bot", messages=MESSAGES, temperature=0, max_tokens=30,
                                                     stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(prompt)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # pieces, not one block


@contextlib.contextmanager
def _slower_steps(scheduler, seconds: float = 0.01):
    """Each decode step of `scheduler` followed by a pause, as a larger model's step would take:
    a tiny model can finish a whole reply before the event loop's next turn (its tokens then
    leave together, as they should), which says nothing about streaming."""
    step = scheduler.decoder.step

    def paused(*args, **kwargs):
        out = step(*args, **kwargs)
        time.sleep(seconds)
        return out

    scheduler.decoder.step = paused
    try:
        yield
    finally:
        del scheduler.decoder.step  # the class's method again


def test_completion_equals_single_generation_and_stop_strings_cut_it(client, server):
    _, state = server
    bot = state.models["bot"]
    prompt, stops = bot.completion_ids("to be or not to be")
    want, n = _alone(state, "bot", prompt, stops, 24)
    answer = client.completions.create(model="bot", prompt="to be or not to be", temperature=0, max_tokens=24)
    assert answer.choices[0].text == want
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), n)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="bot", prompt="to be or not to be", temperature=0, max_tokens=24, stream=True))
    assert streamed == want
    stop = want[len(want) // 2:len(want) // 2 + 3]
    cut = client.completions.create(model="bot", prompt="to be or not to be", temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed_cut = "".join(c.choices[0].text for c in client.completions.create(
        model="bot", prompt="to be or not to be", temperature=0, max_tokens=24, stop=stop, stream=True))
    assert streamed_cut == cut.choices[0].text


def test_sampling_with_a_seed_repeats(client):
    def ask(seed: int) -> str:
        return client.chat.completions.create(model="bot", messages=MESSAGES, temperature=1.0, top_p=0.95,
                                              max_tokens=20, seed=seed, presence_penalty=0.5).choices[0].message.content
    assert ask(11) == ask(11)
    assert len({ask(11), ask(12), ask(13)}) > 1


@pytest.mark.parametrize("model", ["bert", "bot"])
def test_embeddings_equal_lmforge_embed(client, server, model):
    _, state = server
    texts = ["a crane is flying", "the king", ""]
    want = embed(state.models[model].loaded, texts)
    got = client.embeddings.create(model=model, input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1, 2]
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want.mean, rtol=1e-5, atol=1e-6)
    assert got.usage.prompt_tokens == sum(len(t) for t in want.tokens)
    as_floats = client.embeddings.create(model=model, input="the king", encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, want.mean[1], rtol=1e-5, atol=1e-6)


def test_classify_gives_every_label_probability(server):
    url, state = server
    texts = ["winner! claim your prize", "see you at lunch"]
    r = httpx.post(url + "/v1/classify", json={"model": "clf", "input": texts}, timeout=30)
    assert r.status_code == 200
    want = class_probabilities(state.models["clf"].loaded, texts)
    for row, expected in zip(r.json()["data"], want):
        assert row["probabilities"] == pytest.approx(dict(zip(["ham", "spam"], expected.tolist())), abs=1e-6)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    assert r.json()["usage"]["prompt_tokens"] > 0
