"""Bad input never takes the server down: each gets OpenAI's error body with a 4xx, and the next
request is served."""

from __future__ import annotations

import httpx
import openai
import pytest

from lmforge.serve.served import load_served
from lmforge.serve.server import ServerThread
from lmforge.serve.state import ServerState
from serve_fixtures import serve_checkpoints, server  # noqa: F401  (fixtures, imported by name: a conftest.py here would shadow tests/conftest.py)

CHAT = {"model": "bot", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
LONG = " ".join(["king"] * 80)  # more tokens than the context of 64


def _post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=30, **kwargs)


CASES = [
    ("malformed JSON", "/v1/chat/completions", {"content": b'{"model": "bot", "messages": ['}, 400, None),
    ("not UTF-8", "/v1/chat/completions", {"content": b'{"model": "\xff"}'}, 400, None),
    ("empty body", "/v1/chat/completions", {"content": b""}, 400, None),
    ("a JSON list", "/v1/chat/completions", {"json": [CHAT]}, 400, None),
    ("no messages", "/v1/chat/completions", {"json": {"model": "bot"}}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"json": {**CHAT, "messages": []}}, 400, "messages"),
    ("a role that is not one", "/v1/chat/completions",
     {"json": {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}}, 400, "messages[0]"),
    ("content a number", "/v1/chat/completions",
     {"json": {**CHAT, "messages": [{"role": "user", "content": 5}]}}, 400, "messages[0].content"),
    ("temperature a string", "/v1/chat/completions", {"json": {**CHAT, "temperature": "hot"}}, 400, "temperature"),
    ("temperature negative", "/v1/chat/completions", {"json": {**CHAT, "temperature": -1}}, 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", {"json": {**CHAT, "top_p": 0}}, 400, "top_p"),
    ("max_tokens a float", "/v1/chat/completions", {"json": {**CHAT, "max_tokens": 2.5}}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/chat/completions", {"json": {**CHAT, "max_tokens": 0}}, 400, "max_tokens"),
    ("max_tokens past the server's limit", "/v1/chat/completions", {"json": {**CHAT, "max_tokens": 49}}, 400,
     "max_tokens"),
    ("stream not a boolean", "/v1/chat/completions", {"json": {**CHAT, "stream": "yes"}}, 400, "stream"),
    ("stop a number", "/v1/chat/completions", {"json": {**CHAT, "stop": 3}}, 400, "stop"),
    ("seed negative", "/v1/chat/completions", {"json": {**CHAT, "seed": -1}}, 400, "seed"),
    ("n of 2", "/v1/chat/completions", {"json": {**CHAT, "n": 2}}, 400, "n"),
    ("logit_bias", "/v1/chat/completions", {"json": {**CHAT, "logit_bias": {"5": 10}}}, 400, "logit_bias"),
    ("tools", "/v1/chat/completions", {"json": {**CHAT, "tools": [{"type": "function"}]}}, 400, "tools"),
    ("an unknown field", "/v1/chat/completions", {"json": {**CHAT, "temprature": 0.5}}, 400, "temprature"),
    ("an unknown model", "/v1/chat/completions", {"json": {**CHAT, "model": "gpt-9"}}, 404, "model"),
    ("a model that cannot chat", "/v1/chat/completions", {"json": {**CHAT, "model": "clf"}}, 400, "model"),
    ("a prompt longer than the context", "/v1/completions",
     {"json": {"model": "bot", "prompt": LONG, "max_tokens": 4}}, 400, "prompt"),
    ("a chat longer than the context", "/v1/chat/completions",
     {"json": {**CHAT, "messages": [{"role": "user", "content": LONG}]}}, 400, "messages"),
    ("token ids outside the vocabulary", "/v1/completions",
     {"json": {"model": "bot", "prompt": [1, 2, 10 ** 6], "max_tokens": 2}}, 400, "prompt"),
    ("several prompts", "/v1/completions", {"json": {"model": "bot", "prompt": ["a", "b"]}}, 400, "prompt"),
    ("embeddings of a number", "/v1/embeddings", {"json": {"model": "bert", "input": 3}}, 400, "input"),
    ("embeddings of nothing", "/v1/embeddings", {"json": {"model": "bert", "input": []}}, 400, "input"),
    ("classify without input", "/v1/classify", {"json": {"model": "clf"}}, 400, "input"),
    ("classify with a chat model", "/v1/classify", {"json": {"model": "bot", "input": "x"}}, 400, "model"),
    ("a body over the size limit", "/v1/chat/completions",
     {"json": {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}}, 413, None),
]


@pytest.mark.parametrize("what, path, send, status, param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error_then_the_server_goes_on(server, what, path, send, status, param):
    url, _ = server
    r = _post(url, path, **send)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    good = _post(url, "/v1/chat/completions", json=CHAT)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_truncation_when_asked_keeps_the_end_of_the_prompt(server):
    url, state = server
    r = _post(url, "/v1/completions", json={"model": "bot", "prompt": LONG, "max_tokens": 4, "truncate": True,
                                            "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 64 - 4
    chat = _post(url, "/v1/chat/completions", json={**CHAT, "truncate": True, "messages": [
        {"role": "user", "content": LONG}, {"role": "assistant", "content": "aye"}, {"role": "user", "content": "hi"}]})
    assert chat.status_code == 200  # the oldest turn went; the rest fit
    bot = state.models["bot"]
    kept = bot.chat_ids([{"role": "assistant", "content": "aye"}, {"role": "user", "content": "hi"}], None)
    assert chat.json()["usage"]["prompt_tokens"] == len(kept)


def test_unknown_routes_and_methods_are_openai_errors(server):
    url, _ = server
    assert httpx.get(url + "/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_wrong_api_key_is_refused(serve_checkpoints):
    served = load_served(str(serve_checkpoints["gpt_run"]), "cpu", max_batch=2)
    state = ServerState(models={served.name: served}, max_tokens=8, api_key="s3cret")
    with ServerThread(state) as url:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret"}):
            r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0) as client:
            assert client.chat.completions.create(**CHAT).choices[0].message.content is not None
        assert httpx.get(url + "/").status_code == 200  # the page itself is public; it asks for the key
