"""Shared pieces of the fault suite: a tiny prepared corpus, tiny run configs, child processes.

Everything heavy is built once per pytest session (module-level cache): the tokenizer and
the prepared data, and the uninterrupted baseline run that the resume scenarios compare with.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import forked_cli

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "fault_runner.py"
TINY_MODEL = {"preset": None, "n_layer": 2, "n_head": 2, "n_embd": 32, "context": 32}
STEPS_PER_EPOCH = 5  # of the data below at batch_size 16 (checked by the baseline)
BASE_STEPS = 12  # the baseline crosses two epoch boundaries (steps 5 and 10)
_CACHE: dict[str, object] = {}


def shared_root(tmp_path_factory) -> Path:
    if "root" not in _CACHE:
        _CACHE["root"] = tmp_path_factory.mktemp("faults")
    return _CACHE["root"]


def tiny_data(tmp_path_factory) -> Path:
    """A few thousand characters of Shakespeare, a 384-token BPE, prepared for `lm`."""
    if "data" not in _CACHE:
        from lmforge.data.prepare import prepare
        from lmforge.commands.quickstart import bundled_corpus
        from lmforge.base.tokenizer import train_tokenizer

        root = shared_root(tmp_path_factory)
        corpus = root / "corpus.txt"
        corpus.write_text(bundled_corpus().read_text(encoding="utf-8")[:6000], encoding="utf-8")
        tok = train_tokenizer([corpus], kind="bpe", vocab_size=384, out_dir=root / "tok", show_progress=False)
        prepare("lm", [corpus], tok, root / "data", val_fraction=0.1, seed=1, show_progress=False)
        _CACHE["data"] = root / "data"
    return _CACHE["data"]


def run_config(data: Path, out_dir: Path, name: str = "run", **train) -> Path:
    """A YAML config for a tiny run `out_dir/name`; returns its path (next to the run)."""
    settings = {"batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 100,
                "eval_batches": 1, "save_every": 3, "sample_tokens": 0, "seed": 7, "max_steps": BASE_STEPS,
                "keep_epochs": 5}
    settings.update(train)
    cfg = {"model": dict(TINY_MODEL), "data": {"path": str(data)}, "train": settings,
           "run": {"out_dir": str(out_dir), "name": name}}
    path = out_dir / f"{name}.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def lmforge(args: list[str], cwd: Path, *, fault: str | None = None, env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a child process through fault_runner (instruments off unless env asks),
    forked from a parent that has imported torch and lmforge already (see forked_cli)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LMFORGE_FAULT", "FAULTS_"))}
    child_env["OMP_NUM_THREADS"] = "1"  # tiny models; 2 shared cores: threads only contend
    child_env.update(env or {})
    if fault:
        child_env["LMFORGE_FAULT"] = fault
    return forked_cli.run([str(RUNNER), *args], cwd, child_env, timeout=timeout)


def baseline(tmp_path_factory) -> Path:
    """The uninterrupted reference run (with its sample log), trained once per session."""
    if "baseline" not in _CACHE:
        root = shared_root(tmp_path_factory) / "baseline"
        cfg = run_config(tiny_data(tmp_path_factory), root, "straight")
        result = lmforge(["train", str(cfg), "--quiet"], root,
                         env={"FAULTS_SAMPLE_LOG": str(root / "samples.log")})
        assert result.returncode == 0, result.stderr
        _CACHE["baseline"] = root / "straight"
    return _CACHE["baseline"]


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a run folder that still resolves (its config points at the same data)."""
    shutil.copytree(run, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["run"].update(out_dir=str(dest.parent), name=dest.name)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in events(run, "train")]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from lmforge.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint).state_dict


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "manifest.json").read_text())["step"]


def leftovers(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("."))


def peak_child_rss_mb() -> float:
    """Peak resident memory of the largest child process waited for so far (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_cli(argv: list[str], *, merged: bool = False) -> tuple[int, str]:
    """(exit status, stderr) of `lmforge ARGV` in this process; with `merged`, stdout and stderr."""
    from lmforge.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err if merged else out):
        code = main(argv)
    return code, err.getvalue()


def clean_error(code: int, message: str, *expected: str) -> None:
    """A user's mistake: exit status 2, an `error:` line naming each of `expected`, no traceback."""
    assert code == 2, message
    assert "Traceback" not in message and "\nerror: " in "\n" + message, message
    for text in expected:
        assert text in message, (text, message)


# The suite's common fixtures; a scenario file imports the ones it uses by name.
@pytest.fixture(scope="module", name="data")
def data_fixture(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module", name="baseline")
def baseline_fixture(tmp_path_factory) -> Path:
    return baseline(tmp_path_factory)
