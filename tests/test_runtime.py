"""Runtime setup: precision advice that follows the hardware, and malloc left alone unless asked."""

import sys

import pytest

from lmforge.base import runtime


@pytest.mark.parametrize("units, precision, expected", [
    ("AMX", "fp32", "train.precision=bf16 trains about 2x faster"),
    (None, "bf16", "bf16 autocast on CPU is usually slower than fp32"),
    ("AVX512-BF16", "fp16", "fp16 autocast on CPU is usually slower than fp32"),
])
def test_cpu_precision_advice_follows_the_hardware(monkeypatch, units, precision, expected):
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: units)
    rt = runtime.setup_runtime("cpu", precision)
    assert any(expected in note for note in rt.notes), rt.notes


def test_no_advice_when_bf16_runs_on_bf16_units(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "AMX")
    rt = runtime.setup_runtime("cpu", "bf16")
    assert not any("slower" in note or "faster" in note for note in rt.notes), rt.notes


def test_cpu_bf16_units_answers_without_raising():
    assert runtime.cpu_bf16_units() in (None, "AMX", "AVX512-BF16")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the malloc tuning is for glibc Linux")
def test_setup_runtime_leaves_malloc_alone_until_asked(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(runtime, "_malloc_tuned", False)
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.35"))
    monkeypatch.delenv("LMFORGE_MALLOC_TUNING", raising=False)
    rt = runtime.setup_runtime("cpu")
    assert calls == [] and not any("malloc" in note for note in rt.notes)
    assert runtime.keep_freed_memory()  # the caller's choice (the CLI makes it for train and quickstart)
    assert calls == [(-1, 2**31 - 1), (-4, 0)]  # trim threshold at its maximum, no mmap
    assert any("glibc malloc keeps freed memory" in note for note in runtime.setup_runtime("cpu").notes)
