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
