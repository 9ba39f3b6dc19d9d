"""Chat: scripted sessions through stdin, history limits, repetition penalty in context, commands."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lmforge.inference.chat_session as chat
from lmforge.commands.chat import chat_interactive, chat_scripted, run_chat
from lmforge.inference.chat_session import ChatSession, StreamDecoder, decode_text
from lmforge.inference.generate import SamplingConfig, apply_repetition_penalty
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.base.tokenizer import load_tokenizer, train_tokenizer
from lmforge.checkpoint import save_checkpoint

CORPUS = "你好\n你好呀\n\n今天天气怎么样\n挺好的\n\nhello there\nhi , how are you ? I ' m running\n"


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat_tok")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    return train_tokenizer([corpus], kind="wordpiece", vocab_size=120, out_dir=root / "tok",
                           min_frequency=1, show_progress=False)


@pytest.fixture(scope="module")
def checkpoint(tok_file: Path, tmp_path_factory) -> Path:
    """A tiny random GPT saved as a checkpoint with the tokenizer."""
    torch.manual_seed(0)
    vocab = load_tokenizer(tok_file).get_vocab_size()
    config = GPTConfig.from_preset("tiny", vocab_size=vocab, context=24)
    model = GPT(config)
    path = tmp_path_factory.mktemp("chat_ckpt") / "best"
    save_checkpoint(path, model_state=model.state_dict(), model_config={"model_type": "gpt", **config.to_dict()},
                    tokenizer_file=tok_file)
    return path


class FixedLogits(nn.Module):
    """Stands in for a GPT: the same next-token logits at every position."""

    def __init__(self, logits: list[float], context: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(context=context)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(len(logits), 1)})
        self.logits = torch.tensor(logits)
        self.prompts: list[list[int]] = []

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> SimpleNamespace:
        return SimpleNamespace(length=0, max_len=max_len or self.config.context)

    def forward(self, input_ids, kv_cache=None, last_only=False, attention_mask=None):
        if kv_cache is None or kv_cache.length == 0:
            self.prompts.append(input_ids[0].tolist())
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        T = 1 if last_only else input_ids.shape[1]
        return self.logits.expand(1, T, -1).clone()  # (1, T, V)


def test_scripted_chat_gives_one_reply_per_line(checkpoint: Path):
    lines = "你好\n今天天气怎么样\nhello there 😀 \x01\n\n你好\n"
    out = io.StringIO()
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=5, seed=1)
    assert run_chat(checkpoint, sampling, stdin=io.StringIO(lines), stdout=out, device="cpu") == 0
    replies = out.getvalue().split("\n")
    assert len(replies) == 5 + 1 and replies[-1] == ""  # one line per input line
    assert replies[3] == ""  # the blank line: a new conversation, an empty line back


def test_the_cli_reads_turns_from_a_pipe(checkpoint: Path, tmp_path: Path):
    transcript = tmp_path / "t.jsonl"
    result = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(checkpoint), "--device", "cpu",
                             "--seed", "3", "--max-reply-tokens", "5", "--transcript", str(transcript)],
                            input="你好\nhello\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    messages = json.loads(transcript.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["你好", "hello"]


def test_context_respects_max_history(tok_file: Path):
    tok = load_tokenizer(tok_file)
    sep = tok.token_to_id("[SEP]")
    model = FixedLogits([0.0] * tok.get_vocab_size())
    model.logits[sep] = 10.0  # greedy: a reply is the next token, then [SEP]
    model.logits[tok.token_to_id("好")] = 20.0
    sampling = SamplingConfig(max_new_tokens=1, temperature=0)
    session = ChatSession(model, tok, sampling, max_history=3)
    out = io.StringIO()
    assert chat_scripted(session, io.StringIO("你好\n天气\n晚安\n你\n"), out) == 4
    assert out.getvalue().splitlines() == ["好"] * 4
    cls = tok.token_to_id("[CLS]")
    expected_last = [cls] + tok.encode("晚安").ids + [sep] + tok.encode("好").ids + [sep] + \
        tok.encode("你").ids + [sep]
    assert model.prompts[-1] == expected_last  # the last 3 turns: user, reply, new user turn
    assert all(p.count(sep) <= 3 for p in model.prompts)
    assert len(session.history) == 8


def test_repetition_penalty_lowers_context_tokens_positive_and_negative(tok_file: Path):
    tok = load_tokenizer(tok_file)
    V, sep = tok.get_vocab_size(), tok.token_to_id("[SEP]")
    a, b = tok.token_to_id("你"), tok.token_to_id("天")  # "你" will be in the context, "天" not
    for base, top, second in ((0.5, 2.0, 1.5), (-10.0, -1.0, -1.5)):
        logits = [base] * V
        logits[a], logits[b] = top, second
        picks = {}
        for penalty in (1.0, 2.0):
            model = FixedLogits(logits)
            session = ChatSession(model, tok, SamplingConfig(max_new_tokens=1, temperature=0,
                                                            repetition_penalty=penalty))
            reply = "".join(session.reply("你好"))
            picks[penalty] = session.history[-1].ids[0]
            context = torch.tensor(model.prompts[0])
            penalized = apply_repetition_penalty(torch.tensor(logits), context, penalty)
            inside = torch.zeros(V, dtype=torch.bool)
            inside[context] = True
            if penalty > 1:
                assert (penalized[inside] < torch.tensor(logits)[inside]).all()  # all lowered, both signs
            assert torch.equal(penalized[~inside], torch.tensor(logits)[~inside])
            assert reply
        assert picks == {1.0: a, 2.0: b}  # GPT2-chitchat's divide-both would keep "你" for negatives
        assert sep not in picks.values()


def test_unknown_characters_never_crash(checkpoint: Path, tok_file: Path):
    tok = load_tokenizer(tok_file)
    session = ChatSession(GPT(GPTConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), context=16)), tok,
                          SamplingConfig(max_new_tokens=30, temperature=1.0, seed=0), max_history=5)
    assert session.encode("\x01\x02") == [tok.token_to_id("[UNK]")]
    assert tok.token_to_id("[SEP]") not in session.encode("[SEP] 😀 ñ")  # typed specials are text
    for text in ["😀😀😀", "\x01", "[SEP][CLS]", "很长" * 40, "   "]:
        "".join(session.reply(text))  # longer than the context: trimmed, not an error
    assert all(len(session.context_ids()) <= 16 for _ in range(1))


def _typed(items: list) -> Callable[[str], str]:
    """A stand-in for input(): each call gives the next line, or raises it when it is an exception."""
    items = iter(items)

    def read_line(prompt: str) -> str:
        item = next(items)
        if isinstance(item, BaseException):
            raise item
        return item

    return read_line


def test_interactive_commands_ctrl_c_and_transcript(tok_file: Path, tmp_path: Path):
    tok = load_tokenizer(tok_file)
    model = FixedLogits([0.0] * tok.get_vocab_size())
    model.logits[tok.token_to_id("好")] = 5.0
    session = ChatSession(model, tok, SamplingConfig(max_new_tokens=4, temperature=0), max_history=2)
    real = chat.stream_generate

    def interrupted(*args, **kwargs):  # Ctrl-C after two tokens of the second reply
        for i, token in enumerate(real(*args, **kwargs)):
            if i == 2 and len(session.history) > 2:
                raise KeyboardInterrupt
            yield token

    chat.stream_generate = interrupted
    saved = tmp_path / "chat.txt"
    read_line = _typed(["你好", KeyboardInterrupt(), "/history", "天气", "/bogus", f"/save {saved}",
                        "/reset", "/history", "晚安", EOFError()])
    out = io.StringIO()
    try:
        chat_interactive(session, out, read_line)
    finally:
        chat.stream_generate = real
    text = out.getvalue()
    assert "bot> 好好好好\n" in text and "[stopped]" in text and "unknown command /bogus" in text
    assert "(Ctrl-D or /quit to leave)" in text and "(history cleared)" in text
    assert [t.text for t in session.history] == ["晚安", "好好好好"]
    assert saved.read_text(encoding="utf-8") == "you: 你好\nbot: 好好好好\nyou: 天气\nbot: 好好\n"
    session.save(tmp_path / "all.jsonl")
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 and records[1]["messages"][0] == {"role": "user", "content": "晚安"}


def test_a_line_that_is_not_utf8_gets_a_note_and_the_chat_goes_on(tok_file: Path):
    tok = load_tokenizer(tok_file)
    model = FixedLogits([0.0] * tok.get_vocab_size())
    model.logits[tok.token_to_id("好")] = 5.0
    session = ChatSession(model, tok, SamplingConfig(max_new_tokens=1, temperature=0))
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # input() in a UTF-8 locale
    out = io.StringIO()
    chat_interactive(session, out, _typed(["caf\udce9", undecodable, "你好", EOFError()]))
    assert out.getvalue().count("not valid UTF-8") == 2 and "bot> 好" in out.getvalue()
    assert [t.text for t in session.history] == ["你好", "好"]
    with pytest.raises(ValueError, match="standard input, line 2"):
        chat_scripted(session, io.StringIO("你好\ncaf\udce9\n"), io.StringIO())


def test_stream_decoder_joins_wordpieces_like_the_text(tok_file: Path):
    tok = load_tokenizer(tok_file)
    assert decode_text(tok, tok.encode("今天天气怎么样").ids) == "今天天气怎么样"
    assert decode_text(tok, tok.encode("hi , how are you ? I ' m running").ids) == "hi, how are you? I'm running"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode("hello there").ids]
    assert "".join(pieces) == "hello there"
