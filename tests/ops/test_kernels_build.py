"""When lmforge's CPU kernels are built, when they are only loaded, and what happens without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.ops import kernels


@pytest.fixture
def real_kernels():
    """The real kernels, loaded in this process (the fake builds below load nothing)."""
    if kernels.ops() is None:
        pytest.skip(f"CPU kernels unavailable: {kernels.unavailable_reason()}")


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """A cache with no build in it, a fresh module state, and `_build` replaced by a recorder."""
    builds = []

    def fake_build(name, folder):
        builds.append(name)
        (folder / f"{name}.so").write_bytes(b"a library")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    return builds


def test_inference_never_builds_and_training_does(real_kernels, empty_cache):
    model = GPT(GPTConfig(vocab_size=31, context=8, n_layer=1, n_head=2, n_embd=16))
    ids = torch.randint(0, 31, (2, 8))
    with torch.inference_mode():
        model(ids)
    with torch.no_grad():
        model(ids[:, :-1], targets=ids[:, 1:])
    assert empty_cache == [] and kernels.ops(build=False) is None
    assert kernels.status_line() == ("CPU kernels: off: not built yet; `lmforge kernels` or a training run "
                                     "on a CPU builds them")
    model(ids[:, :-1], targets=ids[:, 1:])[0].backward()  # training: builds once
    assert len(empty_cache) == 1 and kernels.ops(build=False) is not None
    assert kernels.status_line() == f"CPU kernels: on (cached in {kernels.build_dir()})"


def test_prepare_for_training_builds_on_a_cpu_only(real_kernels, empty_cache):
    assert kernels.prepare_for_training(torch.device("cuda")) == "CPU kernels: not used on cuda"
    assert empty_cache == []
    assert kernels.prepare_for_training(torch.device("cpu")).startswith("CPU kernels: on (cached in ")
    assert len(empty_cache) == 1


def test_a_failed_build_is_tried_again_when_the_compiler_changes(monkeypatch, empty_cache, capsys):
    def failing(name, folder):
        empty_cache.append(name)
        raise RuntimeError("x.cpp:3: error: no such intrinsic")

    toolchain = ["c++=/usr/bin/c++ (aaaa), ninja=/bin/ninja"]
    monkeypatch.setattr(kernels, "_build", failing)
    monkeypatch.setattr(kernels, "_toolchain", lambda: toolchain[0])
    for compiler in ("aaaa", "aaaa", "bbbb"):  # three processes; the compiler changes before the third
        toolchain[0] = f"c++=/usr/bin/c++ ({compiler}), ninja=/bin/ninja"
        monkeypatch.setattr(kernels, "_state", {})
        assert kernels.ops() is None
    assert len(empty_cache) == 2
    reason = kernels.unavailable_reason()
    assert "x.cpp:3: error: no such intrinsic" in reason and "tried again when the C++ compiler changes" in reason
    assert f"delete that folder and run `lmforge kernels`" in reason
    record = (kernels.build_dir() / kernels.FAILED).read_text()
    assert "toolchain: c++=/usr/bin/c++ (bbbb), ninja=/bin/ninja" in record
    assert kernels.status_line() == f"CPU kernels: off: {reason}"


def test_a_run_that_may_not_build_reports_the_recorded_failure_without_retrying(monkeypatch, empty_cache):
    folder = kernels.build_dir()
    folder.mkdir(parents=True)
    (folder / kernels.FAILED).write_text("the build failed (why)\n\ntoolchain: another one\n\nlog", encoding="utf-8")
    monkeypatch.setattr(kernels, "_toolchain", lambda: pytest.fail("no compiler check without a build"))
    assert kernels.ops(build=False) is None and kernels.unavailable_reason() == "the build failed (why)"
    assert empty_cache == []


def test_the_compilers_output_is_captured_not_shown(capfd):
    output: list[str] = []
    with kernels._captured(output):
        print("a banner from python")
        os.write(1, b"a compiler's stdout\n")
        os.write(2, b"a compiler's stderr\n")
        subprocess.run(["echo", "a child process"], check=True)
    shown = capfd.readouterr()
    assert shown.out == "" and shown.err == ""
    text = "".join(output)
    for line in ("a banner from python", "a compiler's stdout", "a compiler's stderr", "a child process"):
        assert line in text


TRAIN = """
import json, sys
if {no_fcntl}:
    sys.modules["fcntl"] = None  # a platform without it
import torch
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.ops import kernels
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=61, context=16, n_layer=2, n_head=2, n_embd=32))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = torch.randint(0, 61, (4, 17))
losses = []
for _ in range(3):
    loss_sum, correct, counted = model(ids[:, :-1], targets=ids[:, 1:])
    (loss_sum / counted).backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss_sum.item() / counted.item())
print(json.dumps({{"losses": losses, "torch_ops": kernels.ops() is None, "reason": kernels.unavailable_reason(),
                  "status": kernels.status_line()}}))
"""


@pytest.mark.parametrize("no_fcntl", [True, False])
def test_gpt_trains_on_torchs_ops_without_fcntl_or_a_compiler(tmp_path: Path, no_fcntl: bool):
    tools = tmp_path / "bin"  # a PATH without c++, g++ or cc
    tools.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", kernels.ENV_SWITCH)}
    env.update(PATH=str(tools), LMFORGE_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", TRAIN.format(no_fcntl=no_fcntl)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    losses = result["losses"]
    assert all(map(lambda x: x == x and abs(x) < float("inf"), losses)) and losses[2] < losses[0], losses
    assert result["torch_ops"] is True
    if no_fcntl:
        assert "no fcntl on this platform" in result["reason"]
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.so"))
    else:
        assert "no C++ compiler: c++ is not on PATH" in result["reason"]
        assert "tried again when the C++ compiler changes" in result["reason"]
        assert "toolchain: c++=None" in next((tmp_path / "cache").rglob(kernels.FAILED)).read_text()
    assert result["status"] == f"CPU kernels: off: {result['reason']}"
    assert "Traceback" not in run.stderr
