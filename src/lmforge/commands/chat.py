"""`lmforge chat`: an interactive loop for a terminal and a scripted one for pipes.

The interactive loop knows /reset, /history, /save FILE and /quit; Ctrl-C stops a reply,
Ctrl-D leaves; a line that is not valid UTF-8 is refused with a note and the chat goes on.
The scripted loop reads each input line as a user turn and writes exactly one output line (a
blank input line starts a new conversation and gets an empty line back, as blank lines
separate dialogues in the corpus); a line that is not valid UTF-8 stops it with an error
naming the line. `--transcript` is checked before the chat starts (a file in a folder that
exists) and written when it ends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from lmforge.commands.files import check_output_file
from lmforge.inference.chat_format import chat_format_of
from lmforge.inference.chat_session import COMMANDS, ChatSession, speaker_name
from lmforge.inference.checks import check_text
from lmforge.inference.generate import SamplingConfig
from lmforge.inference.loaded import load_for_inference


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        out.write("(history cleared)\n")
    elif name == "/history":
        first = max(0, len(session.history) - session.max_history + 1)  # what the next reply sees
        for i, turn in enumerate(session.history):
            mark = "*" if i >= first else " "
            out.write(f"{mark} {speaker_name(turn)}: {turn.text}\n")
        out.write(f"({len(session.history)} turns; * = context of the next reply, "
                  f"max_history {session.max_history})\n")
    elif name == "/save":
        if not arg.strip():
            out.write("usage: /save FILE (.txt or .jsonl)\n")
        else:
            try:
                out.write(f"(saved {session.save(Path(arg.strip()))})\n")
            except OSError as err:
                out.write(f"(could not save: {err})\n")
    else:
        out.write(f"unknown command {name}; commands: {COMMANDS}\n")
    return True


def chat_interactive(session: ChatSession, out: TextIO, read_line: Callable[[str], str] = input) -> None:
    """The terminal loop: `read_line` raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
    out.write(f"commands: {COMMANDS} | Ctrl-C stops a reply, Ctrl-D leaves\n")
    while True:
        try:
            line = check_text(read_line("you> "), "that line").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /quit to leave)\n")
            continue
        except ValueError as err:  # check_text, or input()'s UnicodeDecodeError
            reason = err if not isinstance(err, UnicodeDecodeError) else "that line is not valid UTF-8"
            out.write(f"({reason}; type it again)\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, out):
                return
            continue
        out.write("bot> ")
        out.flush()
        stream = session.reply(line)
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        finally:
            stream.close()
        out.write("\n")
        out.flush()


def chat_scripted(session: ChatSession, lines: TextIO, out: TextIO) -> int:
    """One reply line per input line; a blank line starts a new conversation. Returns replies made."""
    replies = 0
    for line in _input_lines(lines):
        if not line.strip():
            session.reset()
            out.write("\n")
        else:
            reply = "".join(session.reply(line))
            out.write(reply.replace("\r", " ").replace("\n", " ") + "\n")
            replies += 1
        out.flush()
    return replies


def _input_lines(stream: TextIO) -> Iterator[str]:
    """The lines of `stream`, each valid UTF-8 or a ValueError naming its line; a stream with a
    byte buffer (standard input) is decoded here, line by line, rather than by its text layer."""
    raw = getattr(stream, "buffer", None)
    for n, line in enumerate(raw if raw is not None else stream, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"standard input, line {n}: not valid UTF-8 (bytes {line[err.start:err.end]!r} "
                                 f"at byte {err.start} of the line); send UTF-8 text, for example through "
                                 "`iconv -f latin1 -t utf-8`") from None
        yield check_text(line, f"standard input, line {n}")


def run_chat(checkpoint: str | Path, sampling: SamplingConfig, *, max_history: int = 3,
             device: str = "auto", transcript: Path | None = None, stdin: TextIO | None = None,
             stdout: TextIO | None = None, chat_format: str = "auto", system: str | None = None) -> int:
    """The `lmforge chat` command: interactive on a terminal, scripted when stdin is a pipe.

    `chat_format`: "auto" chats in the checkpoint's chat template when it has one (an imported
    model, or one fine-tuned from it), else GPT2-chitchat's format; "template" / "chitchat" insist."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    if transcript is not None:
        transcript = check_output_file(transcript, "--transcript")
    loaded = load_for_inference(checkpoint, device)
    if not hasattr(loaded.model, "new_kv_cache"):
        raise ValueError(f"{loaded.path}: chat needs a GPT checkpoint (a dialogue fine-tune)")
    fmt = chat_format_of(loaded, chat_format)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=loaded.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    session = ChatSession(loaded.model, loaded.tokenizer, sampling, max_history=max_history,
                          generator=generator, chat_format=fmt, system=system)
    try:
        if stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            print(f"chat with {loaded.path} ({fmt.name} format, max_history {max_history})", file=stdout)
            chat_interactive(session, stdout)
        else:
            chat_scripted(session, stdin, stdout)
    finally:
        if transcript is not None:
            print(f"transcript saved: {session.save(transcript)}", file=sys.stderr)
    return 0
