"""`lmforge serve` as a user runs it: the URL printed, SIGTERM lets a streaming request finish
before the process exits, and refusals (a non-local host without a key, a busy port) are clear."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lmforge.base.tokenizer import load_tokenizer
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.commands.serve import is_local
from lmforge.models.gpt import GPT, GPTConfig
from serve_fixtures import serve_checkpoints, server  # noqa: F401  (fixtures, imported by name: a conftest.py here would shadow tests/conftest.py)


@pytest.fixture(scope="module")
def long_context_gpt(serve_checkpoints):
    """A GPT with room for a few hundred new tokens (the session's bot has a context of 64)."""
    tokenizer = serve_checkpoints["root"] / "wp" / "tokenizer.json"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=load_tokenizer(tokenizer).get_vocab_size(), context=512, n_layer=2, n_head=2,
                          n_embd=32))
    return save_checkpoint(serve_checkpoints["root"] / "long", model_state=model.state_dict(),
                           model_config={"model_type": "gpt", **model.config.to_dict()}, tokenizer_file=tokenizer)


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("serving on "):
            return proc, line.split()[2]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines))


def test_sigterm_lets_the_streaming_request_finish_then_exits(long_context_gpt):
    proc, url = _start([f"long={long_context_gpt}", "--port", "0", "--max-tokens", "400", "--threads", "1"])
    try:
        assert url.startswith("http://127.0.0.1:")
        body = {"model": "long", "prompt": "the king", "max_tokens": 400, "temperature": 0, "stream": True,
                "stop": ["\u2603"], "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            events = [line[len("data: "):] for line in lines if line]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 400  # the whole answer, after SIGTERM
        assert proc.wait(30) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/v1/models", timeout=5)
    finally:
        proc.kill()
        proc.wait()


def test_refusals_are_clear_errors(serve_checkpoints, capsys):
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost") and not is_local("0.0.0.0")
    gpt = str(serve_checkpoints["gpt_run"])
    assert main(["serve", gpt, "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", gpt, "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", gpt, f"bot={serve_checkpoints['clf']}", "--port", "0"]) == 2
    assert "two models would be named 'bot'" in capsys.readouterr().err
    assert main(["serve", str(serve_checkpoints["root"] / "nothing"), "--port", "0"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(["serve", gpt, "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", gpt, "--threads", "0"]) == 2
    assert "--threads 0: must be an integer >= 1" in capsys.readouterr().err
