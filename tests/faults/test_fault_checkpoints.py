"""Checkpoints that survive signals, full disks, retention and damage, and never run code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import faultkit as fk
from faultkit import data_fixture, baseline_fixture  # noqa: F401  (fixtures)
from lmforge.checkpoint import load_checkpoint
from lmforge.train.run import resolve_resume


def _fix_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest vouch for a tampered file, as an attacker who controls the folder would."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    raw = (ckpt / name).read_bytes()
    manifest["files"][name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# -- signals ----------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(data: Path, baseline: Path, tmp_path: Path):
    """SIGTERM during step 4, a second signal (SIGINT) in the middle of the save it causes."""
    cfg = fk.run_config(data, tmp_path, "stopped")
    stopped = fk.lmforge(["train", str(cfg), "--quiet"], tmp_path,
                         env={"FAULTS_SIGNAL_AT": "4:SIGTERM", "FAULTS_SIGNAL_IN_SAVE": "SIGINT"})
    assert stopped.returncode == 128 + 15, stopped.stderr
    assert "Traceback" not in stopped.stderr
    run = tmp_path / "stopped"
    last = run / "checkpoints" / "last"
    assert fk.checkpoint_step(last) == 4 and fk.leftovers(run / "checkpoints") == []
    load_checkpoint(last, with_training_state=True)
    assert fk.events(run, "end")[-1]["reason"] == "signal"
    resumed = fk.lmforge(["train", "--resume", str(run), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    fk.assert_same_weights(baseline / "checkpoints" / "last", last)
    assert fk.losses(run) == fk.losses(baseline)


def test_sigint_stops_with_status_130_and_a_checkpoint(data: Path, tmp_path: Path):
    cfg = fk.run_config(data, tmp_path, "stopped", max_steps=40)
    stopped = fk.lmforge(["train", str(cfg), "--quiet"], tmp_path,
                         env={"FAULTS_SIGNAL_AT": "7:SIGINT", "FAULTS_SIGNAL_IN_SAVE": "SIGTERM"})
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert fk.checkpoint_step(tmp_path / "stopped" / "checkpoints" / "last") == 7


# -- disk full --------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [60_000, 200_000], ids=["in_weights", "in_training_state"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(limit: int, data: Path, tmp_path: Path):
    cfg = fk.run_config(data, tmp_path, "full", max_steps=6, save_every=2, eval_every=1000)
    full = fk.lmforge(["train", str(cfg), "--quiet"], tmp_path,
                      env={"FAULTS_FSIZE_AFTER_SAVES": f"1:{limit}"})
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr
    assert "error: disk full while saving checkpoint" in full.stderr
    ckpts = tmp_path / "full" / "checkpoints"
    assert fk.leftovers(ckpts) == []  # temp folder removed
    assert fk.checkpoint_step(ckpts / "last") == 2
    load_checkpoint(ckpts / "last", with_training_state=True)


# -- retention --------------------------------------------------------------------------------


def test_retention_keeps_the_newest_epochs_numerically_and_never_the_new_one_first(data: Path, tmp_path: Path):
    """keep_epochs=2 over 11 epochs; the process dies while writing epoch-11."""
    cfg = fk.run_config(data, tmp_path, "kept", max_steps=None, epochs=11, keep_epochs=2, save_every=1000,
                        log_every=100)
    died = fk.lmforge(["train", str(cfg), "--quiet"], tmp_path, fault="ckpt_mid_write:epoch-11")
    assert died.returncode == 137, died.stderr
    ckpts = tmp_path / "kept" / "checkpoints"
    epochs = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("epoch-"))
    assert epochs == ["epoch-10", "epoch-9"]  # numeric: epoch-10 is newer than epoch-9
    for name in epochs:
        load_checkpoint(ckpts / name, with_training_state=True)
    assert fk.leftovers(ckpts) == [".epoch-11.tmp-" + fk.leftovers(ckpts)[0].split("-")[-1]]
    _, checkpoint = resolve_resume(tmp_path / "kept", None, [])
    assert fk.checkpoint_step(checkpoint) == 10 * fk.STEPS_PER_EPOCH and fk.leftovers(ckpts) == []


# -- damage -----------------------------------------------------------------------------------


def test_a_flipped_byte_or_truncation_in_any_file_names_the_file(baseline: Path, tmp_path: Path):
    source = baseline / "checkpoints" / "last"
    names = sorted(json.loads((source / "manifest.json").read_text())["files"])
    assert {"model.safetensors", "training_state.pt", "config.json", "tokenizer.json"} <= set(names)
    for name in names:
        for damage in ("flip", "truncate"):
            ckpt = tmp_path / f"{damage}-{name}"
            shutil.copytree(source, ckpt)
            raw = bytearray((ckpt / name).read_bytes())
            if damage == "flip":
                raw[len(raw) // 2] ^= 0x01
            else:
                raw = raw[: len(raw) // 2]
            (ckpt / name).write_bytes(bytes(raw))
            with pytest.raises(ValueError) as err:
                load_checkpoint(ckpt, with_training_state=True)
            expected = "sha256 mismatch" if damage == "flip" else "manifest says"
            assert str(ckpt / name) in str(err.value) and expected in str(err.value)
    code, message = fk.run_cli(["generate", str(tmp_path / "flip-model.safetensors"), "--max-new-tokens", "2"])
    assert code == 2 and "sha256 mismatch" in message and "Traceback" not in message


def test_a_damaged_manifest_never_loads_wrong_data(baseline: Path, tmp_path: Path):
    source = baseline / "checkpoints" / "last"
    good = fk.weights(source)
    size = (source / "manifest.json").stat().st_size
    for position in range(0, size, 5):
        ckpt = tmp_path / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(source, ckpt)
        raw = bytearray((ckpt / "manifest.json").read_bytes())
        raw[position] ^= 0x01
        (ckpt / "manifest.json").write_bytes(bytes(raw))
        try:
            loaded = load_checkpoint(ckpt).state_dict
        except ValueError as err:
            assert "manifest.json" in str(err) or "mismatch" in str(err) or "manifest says" in str(err), str(err)
            continue
        assert all(torch.equal(loaded[k], good[k]) for k in good)  # a harmless field (a date) changed


# -- untrusted files --------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_training_state_cannot_run(baseline: Path, tmp_path: Path, monkeypatch):
    run = fk.copy_run(baseline, tmp_path / "run")
    ckpt = run / "checkpoints" / "last"
    marker = tmp_path / "pwned"
    torch.save({"loop": _Payload(str(marker))}, ckpt / "training_state.pt")
    _fix_manifest(ckpt, "training_state.pt")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    code, message = fk.run_cli(["train", "--resume", str(run), "--quiet"])
    assert code == 2 and "refused to load" in message and str(ckpt / "training_state.pt") in message
    assert "weights_only=False" not in message  # no advice to load it unsafely
    assert not marker.exists()
    assert calls and all(flag is True for flag in calls)  # never retried unsafely


@pytest.mark.parametrize("header", [b"\xff" * 8 + b"{}", (10**12).to_bytes(8, "little") + b"{",
                                    (20).to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}'],
                         ids=["huge_length", "length_past_the_end", "not_json"])
def test_a_bogus_safetensors_header_is_refused(header: bytes, baseline: Path, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(baseline / "checkpoints" / "last", ckpt)
    (ckpt / "model.safetensors").write_bytes(header)
    _fix_manifest(ckpt, "model.safetensors")
    code, message = fk.run_cli(["generate", str(ckpt), "--max-new-tokens", "2"])
    assert code == 2 and "not a valid safetensors file" in message and "model.safetensors" in message


def test_weights_with_nan_are_refused(baseline: Path, data: Path, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(baseline / "checkpoints" / "last", ckpt)
    state = {k: v.clone() for k, v in fk.weights(ckpt).items() if k != "lm_head.weight"}
    name = next(iter(state))
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _fix_manifest(ckpt, "model.safetensors")
    code, message = fk.run_cli(["generate", str(ckpt), "--max-new-tokens", "2"])
    assert code == 2 and "NaN" in message and name in message
    cfg = fk.run_config(data, tmp_path, "finetune")
    code, message = fk.run_cli(["train", str(cfg), f"model.init_from={ckpt}", "--quiet"])
    assert code == 2 and "NaN" in message and not (tmp_path / "finetune" / "checkpoints").exists()
