"""The command line as a user runs it: subprocesses, exit codes, messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import forked_cli
from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.train.loop import train


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def forked_lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return forked_cli.run(["-m", "lmforge", *args], cwd, _env())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LMFORGE_FAULT"}


@pytest.fixture(scope="module")
def trained_run(lm_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(load_config(None, base=tiny_run(lm_data, out, max_steps=30)), quiet=True).run_dir


def test_generate_streams_seeded_samples(trained_run: Path, tmp_path: Path):
    args = ["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3",
            "--top-k", "20", "--num-samples", "2"]
    # The second process is forked from a warm parent (forked_cli): the same text in another process
    # without paying for a second interpreter's startup.
    first, second = lmforge(*args, cwd=tmp_path), forked_lmforge(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # same seed, same text
    assert first.stdout.count("--- sample") == 2 and first.stdout.count("ROMEO:") >= 2
    greedy = forked_lmforge("generate", str(trained_run / "checkpoints" / "best"), "--prompt", "ROMEO:",
                            "--temperature", "0", "--max-new-tokens", "10", cwd=tmp_path)
    assert greedy.returncode == 0 and greedy.stdout.startswith("ROMEO:")


def test_config_typo_stops_before_work_with_exit_code_2(lm_data: Path, tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"data:\n  path: {lm_data}\ntrain:\n  lerning_rate: 0.1\n  batch_size: 0\n")
    result = lmforge("train", str(config), "model.n_layr=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "3 problem(s)" in result.stderr
    assert "did you mean 'lr'" in result.stderr and "did you mean 'n_layer'" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_a_run_folder_is_never_silently_overwritten(trained_run: Path, lm_data: Path, tmp_path: Path):
    cfg = tiny_run(lm_data, trained_run.parent, max_steps=2)
    config = tmp_path / "again.yaml"
    import yaml
    config.write_text(yaml.safe_dump(cfg))
    result = lmforge("train", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--resume" in result.stderr


def test_report_command_rebuilds_the_report(trained_run: Path, tmp_path: Path):
    result = lmforge("report", str(trained_run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = (trained_run / "report.html").read_text()
    assert "<img" in html and (trained_run / "plots" / "loss.png").stat().st_size > 1000


def test_prepare_reports_a_missing_file(tmp_path: Path):
    result = lmforge("prepare", "--input", "nope.txt", "--tokenizer", "tok", "--out", "d", cwd=tmp_path)
    assert result.returncode == 2 and "nope.txt" in result.stderr


def test_kernels_command_says_whether_the_cpu_kernels_load(tmp_path: Path, monkeypatch):
    from lmforge.ops import kernels

    shown = lmforge("kernels", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    if kernels.ops() is not None:
        assert f"lmforge CPU kernels: loaded from {kernels.build_dir()}" in shown.stdout
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    off = lmforge("kernels", cwd=tmp_path)
    assert off.returncode == 0
    assert "lmforge CPU kernels: off, torch's attention and softmax are used (LMFORGE_CPU_KERNELS=0)" in off.stdout


def test_only_the_training_commands_tune_malloc(monkeypatch, tmp_path: Path):
    from lmforge.base import runtime
    from lmforge.cli import main

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr("lmforge.train.entry.train_command", lambda *a, **k: calls.append("train") or 0)
    monkeypatch.setattr("lmforge.commands.quickstart.quickstart", lambda *a, **k: calls.append("quickstart"))
    monkeypatch.setattr("lmforge.commands.generate.generate_command", lambda *a, **k: calls.append("generate"))
    monkeypatch.setattr("lmforge.report.write_report", lambda run_dir: calls.append("report") or run_dir)
    assert main(["train", "cfg.yaml", "train.lr=1e-3"]) == 0
    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    assert main(["generate", "run", "--prompt", "x"]) == 0
    assert main(["report", "run"]) == 0
    assert calls == ["malloc", "train", "malloc", "quickstart", "generate", "report"]


def test_init_writes_an_example_config_and_lists_them(tmp_path: Path, capsys):
    from lmforge.cli import main

    assert main(["init"]) == 0 and "gpt-shakespeare" in capsys.readouterr().out
    assert main(["init", "lm", "--out", str(tmp_path)]) == 0
    written = tmp_path / "gpt-shakespeare.yaml"
    assert written.is_file() and f"lmforge train {written}" in capsys.readouterr().out
    assert main(["init", "lm", "--out", str(tmp_path)]) == 2  # kept unless --overwrite
    assert main(["init", "lm", "--out", str(tmp_path), "--overwrite"]) == 0
