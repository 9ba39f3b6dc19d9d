"""Training that trains what it says, once: one process per run folder, no loss of 0 on nothing,
model.init_from and --resume that never train another architecture than the config records,
clear errors for a model the task cannot train, honest end lines, and resumes that notice
changed data and leave a finished run alone.

Runs go through `lmforge.cli.main` in this process (the error paths stop before any step), or a
`lmforge` child (faultkit) where a second process is the point."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import faultkit as fk
from faultkit import data_fixture, baseline_fixture  # noqa: F401  (fixtures)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _config(data: Path, out_dir: Path, name: str, model: dict | None = None, **train) -> Path:
    """A tiny run's YAML (faultkit's), with `model` in place of the tiny model when given."""
    path = fk.run_config(data, out_dir, name, **train)
    if model is not None:
        cfg = yaml.safe_load(path.read_text())
        cfg["model"] = model
        path.write_text(yaml.safe_dump(cfg))
    return path


# -- 1. one process per run folder ---------------------------------------------------------------


def _steps_logged(run: Path) -> list[int]:
    """The train events' steps so far (a line being written is not one yet)."""
    with contextlib.suppress(OSError):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [e["step"] for e in map(_json_or_none, lines) if e and e["event"] == "train"]
    return []


def _json_or_none(line: str) -> dict | None:
    with contextlib.suppress(ValueError):
        return json.loads(line)
    return None


def test_two_trains_on_one_run_folder_the_second_names_the_holder(data: Path, tmp_path: Path):
    """A run that hangs after step 2 holds `race`; a second `lmforge train` on it stops at once
    naming the holder's pid and touches nothing; once the holder is killed (-9: its lock file
    stays behind) the next train takes the folder over."""
    cfg = fk.run_config(data, tmp_path, "race", max_steps=4)
    run = tmp_path / "race"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMFORGE_FAULT", "FAULTS_"))}
    first = subprocess.Popen([sys.executable, str(fk.RUNNER), "train", str(cfg), "--quiet"], cwd=tmp_path,
                             env={**env, "OMP_NUM_THREADS": "1", "LMFORGE_FAULT": "hang:after_step_2"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_steps_logged(run)) < 2:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached step 2"
            time.sleep(0.1)
        before = _snapshot(run)
        code, message = fk.run_cli(["train", str(cfg), "--quiet"], merged=True)
        fk.clean_error(code, message, f"run folder {run} is in use by process {first.pid}")
        assert _snapshot(run) == before  # nothing of the first run touched
    finally:
        first.kill()
        first.communicate()
    assert (tmp_path / ".race.lock").exists()  # what the killed holder left
    code, message = fk.run_cli(["train", str(cfg), "--quiet"], merged=True)
    assert code == 0, message
    assert [e["step"] for e in fk.events(run, "train")] == [1, 2, 3, 4]  # one run's history
    assert not (tmp_path / ".race.lock").exists()


# -- 2. nothing to learn -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dialogues(data: Path, tmp_path_factory) -> Path:
    """A dialogue folder prepared with the tiny BPE: 40 two-turn dialogues."""
    root = tmp_path_factory.mktemp("dialogues")
    words = (data.parent / "corpus.txt").read_text().split()
    lines = [json.dumps({"turns": [" ".join(words[i:i + 6]), " ".join(words[i + 6:i + 12])]})
             for i in range(0, 40 * 12, 12)]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    code, message = fk.run_cli(["prepare", "--task", "dialogue", "--input", str(root / "chat.jsonl"), "--tokenizer",
                               str(data / "tokenizer.json"), "--out", str(root / "data")], merged=True)
    assert code == 0, message
    return root / "data"


def test_dialogue_responses_without_a_reply_token_is_an_error_naming_the_counts(dialogues: Path, tmp_path: Path):
    """An older folder (prepare now refuses it) whose train split holds no reply: loss_on=responses
    has nothing to learn, and says so instead of training to "loss 0.0000"."""
    old = tmp_path / "old"
    shutil.copytree(dialogues, old)
    roles = old / "train.roles"
    roles.write_bytes(bytes(roles.stat().st_size))  # every token the user's
    samples = json.loads((old / "meta.json").read_text())["splits"]["train"]["samples"]
    cfg = fk.run_config(old, tmp_path, "chat", task="dialogue", batch_size=4, max_steps=3)
    code, message = fk.run_cli(["train", str(cfg), "--quiet"], merged=True)
    fk.clean_error(code, message, "train split", f"{samples:,} dialogues", "0 reply tokens", "train.loss_on=all")
    assert not (tmp_path / "chat" / "checkpoints").exists()
    assert fk.run_cli(["train", str(cfg), "train.loss_on=all", "--quiet"], merged=True)[0] == 0  # every turn: something to learn


# -- 3. model.init_from and the model.* fields -------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("model.n_embd=64", ["model.n_embd=64", "n_embd=32"]),
    ("model.context=64", ["model.context=64", "32 learned positions"]),
    ("model.n_layer=3", ["model.n_layer=3", "n_layer=2"]),
    ("model.n_head=4", ["model.n_head=4", "n_head=2"]),
    ("model.preset=mini", ["model.preset=mini", "n_embd=32"]),
    ("model.activation=relu", ["model.activation=relu", "activation=gelu"]),
    ("model.kind=bert", ["model.kind=bert", "kind=gpt"]),
])
def test_init_from_refuses_model_fields_the_checkpoint_fixes(override: str, expected: list[str], data: Path,
                                                             baseline: Path, tmp_path: Path):
    cfg = _config(data, tmp_path, "tuned", model={}, max_steps=2)
    init = baseline / "checkpoints" / "last"
    code, message = fk.run_cli(["train", str(cfg), f"model.init_from={init}", override, "--quiet"], merged=True)
    fk.clean_error(code, message, f"model.init_from {init}", *expected)
    assert not (tmp_path / "tuned").exists()


def test_init_from_honours_a_shorter_context_and_records_what_was_trained(data: Path, baseline: Path,
                                                                          tmp_path: Path):
    from lmforge.checkpoint import load_checkpoint

    init = baseline / "checkpoints" / "last"
    cfg = _config(data, tmp_path, "short", model={"init_from": str(init)}, max_steps=2)
    assert fk.run_cli(["train", str(cfg), "model.context=16", "model.dropout=0.1", "--quiet"], merged=True)[0] == 0
    saved = yaml.safe_load((tmp_path / "short" / "config.yaml").read_text())["model"]
    assert {k: saved[k] for k in ("kind", "preset", "n_layer", "n_head", "n_embd", "context", "activation",
                                  "dropout")} == {"kind": "gpt", "preset": None, "n_layer": 2, "n_head": 2,
                                                  "n_embd": 32, "context": 16, "activation": "gelu",
                                                  "dropout": 0.1}
    trained = load_checkpoint(tmp_path / "short" / "checkpoints" / "last")
    assert trained.model_config["context"] == 16 and trained.model_config["n_embd"] == 32
    assert tuple(trained.state_dict["transformer.wpe.weight"].shape) == (16, 32)
    # no model.* field set at all (preset "mini" is only the default): the checkpoint's shape, recorded
    cfg = _config(data, tmp_path, "plain", model={"init_from": str(init)}, max_steps=1)
    assert fk.run_cli(["train", str(cfg), "--quiet"], merged=True)[0] == 0
    saved = yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["model"]
    assert (saved["preset"], saved["n_embd"], saved["context"]) == (None, 32, 32)


# -- 4. a model the task cannot train, an architecture a resume cannot change ----------------------


def _fake_checkpoint(path: Path, data: Path, arch: dict | None = None, *, classifier_of: Path | None = None) -> Path:
    """A checkpoint of `arch` (random weights), or a 2-label classifier on `classifier_of`'s GPT."""
    import torch

    from lmforge.checkpoint import load_model, save_checkpoint
    from lmforge.models.heads import SequenceClassifier, classifier_architecture
    from lmforge.models.registry import model_from_architecture

    torch.manual_seed(0)
    if classifier_of is not None:
        backbone, ckpt = load_model(classifier_of)
        arch = classifier_architecture(ckpt.model_config, ["ham", "spam"])
        model = SequenceClassifier(backbone, 2, arch["pooling"])
    else:
        model = model_from_architecture(arch)
    return save_checkpoint(path, model_state=model.state_dict(), model_config=arch,
                           tokenizer_file=data / "tokenizer.json")


def test_a_model_the_task_cannot_train_is_a_clear_error(data: Path, dialogues: Path, baseline: Path,
                                                        tmp_path: Path):
    cfg = fk.run_config(data, tmp_path, "lm", max_steps=2)
    fk.clean_error(*fk.run_cli(["train", str(cfg), "model.kind=bert", "--quiet"], merged=True), "train.task=lm", "model.kind=bert",
                   "gpt")
    chat = fk.run_config(dialogues, tmp_path, "chat", task="dialogue", batch_size=4, max_steps=2)
    fk.clean_error(*fk.run_cli(["train", str(chat), "model.kind=bert", "--quiet"], merged=True), "train.task=dialogue",
                   "model.kind=bert")
    plain = _config(data, tmp_path, "tuned", model={}, max_steps=2)
    classifier = _fake_checkpoint(tmp_path / "classifier", data, classifier_of=baseline / "checkpoints" / "last")
    fk.clean_error(*fk.run_cli(["train", str(plain), f"model.init_from={classifier}", "--quiet"], merged=True),
                   f"model.init_from {classifier}", "a classifier", "train.task=lm needs a gpt")
    bert = _fake_checkpoint(tmp_path / "bert", data, {"model_type": "bert", "vocab_size": 384, "n_layer": 1,
                                                      "n_head": 2, "n_embd": 32, "context": 32})
    fk.clean_error(*fk.run_cli(["train", str(plain), f"model.init_from={bert}", "--quiet"], merged=True),
                   f"model.init_from {bert}", "a bert checkpoint", "train.task=lm needs a gpt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["bert", "classifier"]  # no run began


def test_resume_with_a_changed_architecture_is_a_clear_error(baseline: Path, tmp_path: Path):
    run = fk.copy_run(baseline, tmp_path / "run")
    before = _snapshot(run)
    code, message = fk.run_cli(["train", "--resume", str(run), "model.n_embd=64", "model.context=16",
                               "train.max_steps=14", "--quiet"], merged=True)
    fk.clean_error(code, message, "--resume", "model.n_embd: 32 in the checkpoint, 64 now",
                   "model.context: 32 in the checkpoint, 16 now")
    assert _snapshot(run) == before


# -- 5. the end line -----------------------------------------------------------------------------


def test_a_run_without_validation_prints_no_best_val_loss(data: Path, tmp_path: Path):
    """A context longer than the val split: no evaluation ran, and the end line does not say inf."""
    cfg = fk.run_config(data, tmp_path, "noval", batch_size=4, max_steps=2)
    code, message = fk.run_cli(["train", str(cfg), "model.context=320"], merged=True)
    assert code == 0, message
    log = (tmp_path / "noval" / "train.log").read_text()
    done = [line for line in log.splitlines() if " done: " in line]  # after its clock time
    assert done and "inf" not in done[0] and "no validation ran" in done[0], done
    assert "inf" not in message


# -- 6. resuming on changed data, resuming a finished run ------------------------------------------


def test_resume_on_changed_data_warns_with_counts_and_hash(data: Path, baseline: Path, tmp_path: Path):
    """The same data folder prepared again, with the same tokenizer, from half the text: the resume
    says what changed (samples and content hash) and goes on from a position that fits."""
    new_data = tmp_path / "data"
    shutil.copytree(data, new_data)
    half = tmp_path / "half.txt"
    half.write_text((data.parent / "corpus.txt").read_text()[:3000])
    assert fk.run_cli(["prepare", "--input", str(half), "--tokenizer", str(data / "tokenizer.json"), "--out",
                      str(new_data), "--overwrite"], merged=True)[0] == 0
    run = fk.copy_run(baseline, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["path"] = str(new_data)  # the run's own data folder, prepared again
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, message = fk.run_cli(["train", "--resume", str(run), "train.max_steps=14"], merged=True)
    assert code == 0, message
    old_hash = json.loads((data / "meta.json").read_text())["content_sha256"]
    new_hash = json.loads((new_data / "meta.json").read_text())["content_sha256"]
    assert "data in" in message and re.search(r"train [\d,]+ -> [\d,]+ samples", message), message
    assert old_hash[:12] in message and new_hash[:12] in message, message
    assert re.search(r"train [\d,]+ -> [\d,]+ samples", (run / "train.log").read_text())
    assert [e["step"] for e in fk.events(run, "train")][-2:] == [13, 14]


def test_resume_of_a_finished_run_changes_nothing(baseline: Path, tmp_path: Path):
    run = fk.copy_run(baseline, tmp_path / "run")
    before = _snapshot(run)
    code, message = fk.run_cli(["train", "--resume", str(run)], merged=True)
    assert code == 0, message
    assert "finished" in message and "train.max_steps" in message, message
    assert _snapshot(run) == before
    # raising the length continues it, as ever
    code, message = fk.run_cli(["train", "--resume", str(run), "train.max_steps=13", "--quiet"], merged=True)
    assert code == 0, message
    assert [e["step"] for e in fk.events(run, "train")][-2:] == [12, 13]
    assert len(fk.events(run, "end")) == 1
