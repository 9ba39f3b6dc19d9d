"""Checks of what a user hands the inference commands, before any model work.

Owns `inference_device` (a `--device` name -> a torch device, or a ValueError naming the valid
choices), `check_text` (a text that tokenizers can take: lone surrogates, which is what invalid
UTF-8 in a command-line argument or a terminal in a C locale becomes, are refused with the byte)
and `check_count` (batch sizes, numbers of samples).
"""

from __future__ import annotations

import re

import torch

from lmforge.base.runtime import pick_device

DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::(\d+))?")
_SURROGATE = re.compile("[\ud800-\udfff]")


def inference_device(name: str, flag: str = "--device") -> torch.device:
    """The device `name` names (auto: cuda, then mps, then cpu); ValueError for any other name
    or a GPU this machine does not have."""
    match = _DEVICE.fullmatch(str(name))
    if match is None:
        raise ValueError(f"{flag} {name!r} is not a device; choose {DEVICES}")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match.group(1) or 0)
        if index >= count:
            raise ValueError(f"{flag} {name}: torch sees {count} CUDA device(s) on this machine; "
                             f"use {flag} auto or cpu" + (f", or cuda:0 to cuda:{count - 1}" if count else ""))
        return torch.device(name)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{flag} mps: Apple MPS is not available on this machine; use {flag} auto or cpu")
    return pick_device(name)[0]


def check_text(text: str, what: str) -> str:
    """`text` itself if it is valid Unicode; else a ValueError naming `what` and the bad byte.

    Bytes that are not UTF-8 reach Python from the command line (and from a terminal in a C
    locale) as lone surrogates U+DC80..U+DCFF, which no tokenizer takes.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected text, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad is None:
        return text
    code = ord(bad.group())
    found = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"a lone surrogate U+{code:04X}"
    raise ValueError(f"{what} is not valid UTF-8 ({found} at character {bad.start()}); pass UTF-8 text "
                     "(a terminal set to UTF-8, e.g. LANG=C.UTF-8, or a file converted with "
                     "`iconv -f latin1 -t utf-8`)")


def check_count(value: int, flag: str) -> int:
    """`value` if it is an integer >= 1 (a batch size, a number of samples), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} {value!r}: must be an integer >= 1")
    return value
