"""Tests for lmforge.checkpoint: round trip, crash safety, damage detection, retention."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import forked_cli
from lmforge.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from lmforge.checkpoint.retention import clean_stale_temp, find_latest, prune_epochs

FAULT_POINTS = ["ckpt_before_write", "ckpt_mid_write", "ckpt_after_flush", "ckpt_after_rename", "ckpt_during_cleanup"]

# A child process that saves step 2 (weights all 2.0) over the existing checkpoint.
CHILD = """
import sys, resource, torch
from pathlib import Path
from lmforge.checkpoint import CheckpointError, save_checkpoint
dest, tok, fsize, big = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if fsize:
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
n = 512 if big == "weights" else 8
state = {"w": torch.full((n, n), 2.0)}
opt = {"step": 2, "exp_avg": torch.zeros(512 if big == "state" else 8, 512)}
try:
    save_checkpoint(dest, model_state=state, model_config={"model_type": "gpt"}, tokenizer_file=tok,
                    training_state=opt)
except CheckpointError as e:
    print(e)
    sys.exit(3)
"""


def _tokenizer(tmp_path: Path) -> Path:
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": {"type": "BPE"}, "added_tokens": []}')
    return tok


def _model_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wte = torch.randn(50, 8, generator=g)
    return {
        "transformer.wte.weight": wte,
        "transformer.h.0.attn.c_attn.weight": torch.randn(24, 8, generator=g),
        "transformer.h.0.ln_1.bias": torch.randn(8, generator=g).to(torch.bfloat16),
        "transformer.position_ids": torch.arange(16),
        "lm_head.weight": wte,  # tied
    }


def _training_state() -> dict:
    return {
        "step": 7,
        "epoch": 1.25,
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(7.0)}},
                      "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0]}]},
        "rng": {"torch": torch.Generator().manual_seed(5).get_state(), "python": random.Random(3).getstate()},
        "best_val_loss": None,
        "sample_position": [4, 1024],
        "task": "lm",
    }


def _save(path: Path, tok: Path, value: float = 1.0, step: int = 1, **kw) -> Path:
    return save_checkpoint(path, model_state={"w": torch.full((8, 8), value)}, model_config={"model_type": "gpt"},
                           tokenizer_file=tok, training_state={"step": step}, **kw)


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a file we tampered with, so the deeper checks are reached."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path)
    state, train_state = _model_state(), _training_state()
    run_config = {"train": {"lr": 3e-4, "max_steps": 10}, "model": {"preset": "tiny"}}
    out = save_checkpoint(tmp_path / "ckpts" / "last", model_state=state, tokenizer_file=tok,
                          model_config={"model_type": "gpt", "n_layer": 1, "n_embd": 8},
                          run_config=run_config, training_state=train_state)
    assert out == tmp_path / "ckpts" / "last"
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["last"]
    assert sorted(os.listdir(out)) == ["config.json", "manifest.json", "model.safetensors", "run_config.json",
                                       "tokenizer.json", "training_state.pt"]
    manifest = read_manifest(out)
    assert (manifest["format"], manifest["step"], manifest["epoch"]) == (1, 7, 1.25)
    assert set(manifest["files"]) == set(os.listdir(out)) - {"manifest.json"}
    assert manifest["files"]["tokenizer.json"]["size"] == tok.stat().st_size

    ck = load_checkpoint(out, with_training_state=True)
    assert ck.model_config == {"model_type": "gpt", "n_layer": 1, "n_embd": 8}
    assert ck.run_config == run_config
    assert ck.tokenizer_file.read_bytes() == tok.read_bytes()
    assert set(ck.state_dict) == set(state)
    for name, t in state.items():
        assert ck.state_dict[name].dtype == t.dtype
        assert torch.equal(ck.state_dict[name], t), name
    ts = ck.training_state
    assert (ts["step"], ts["epoch"], ts["best_val_loss"], ts["task"]) == (7, 1.25, None, "lm")
    assert ts["sample_position"] == [4, 1024]
    assert torch.equal(ts["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert ts["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(ts["rng"]["torch"], train_state["rng"]["torch"])
    assert ts["rng"]["python"] == random.Random(3).getstate()
    assert load_checkpoint(out).training_state is None


def test_tied_weights_stored_once_and_restored_shared(tmp_path: Path) -> None:
    out = save_checkpoint(tmp_path / "last", model_state=_model_state(), model_config={"model_type": "gpt"},
                          tokenizer_file=_tokenizer(tmp_path))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 4
        assert json.loads(f.metadata()["aliases"]) == {"lm_head.weight": "transformer.wte.weight"}
    sd = load_checkpoint(out).state_dict
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    # Overlapping but different views of one storage are copied, not aliased.
    base = torch.arange(12.0)
    out2 = save_checkpoint(tmp_path / "views", model_state={"a": base[:6], "b": base[6:], "c": base},
                           model_config={"model_type": "gpt"}, tokenizer_file=_tokenizer(tmp_path))
    sd2 = load_checkpoint(out2).state_dict
    assert sd2["b"].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert sd2["c"].tolist() == base.tolist()


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_at_fault_point_keeps_a_complete_checkpoint(tmp_path: Path, point: str) -> None:
    tok, ckpts = _tokenizer(tmp_path), tmp_path / "checkpoints"
    _save(ckpts / "last", tok, value=1.0, step=1)
    _save(ckpts / "epoch-1", tok, value=1.0, step=1)
    env = {**os.environ, "LMFORGE_FAULT": point}
    proc = forked_cli.run(["-c", CHILD, str(ckpts / "last"), str(tok), "0", "none"], tmp_path, env, timeout=120)
    assert proc.returncode == 137, proc.stderr
    leftovers = sorted(p for p in os.listdir(ckpts) if p.startswith("."))
    assert leftovers, "a crash mid-save leaves a hidden temp or old folder"
    expected_step = 2 if point == "ckpt_during_cleanup" else 1
    if point == "ckpt_after_rename":
        assert not (ckpts / "last").exists()
        assert find_latest(ckpts) == ckpts / "epoch-1"  # never the hidden .old / .tmp copies
    else:
        assert load_checkpoint(ckpts / "last").state_dict["w"][0, 0].item() == float(expected_step)
        assert find_latest(ckpts) == ckpts / "last"

    restored = clean_stale_temp(ckpts)
    assert restored == ([ckpts / "last"] if point == "ckpt_after_rename" else [])
    assert sorted(os.listdir(ckpts)) == ["epoch-1", "last"]
    ck = load_checkpoint(ckpts / "last", with_training_state=True)
    assert ck.training_state["step"] == expected_step
    assert ck.state_dict["w"].sum().item() == 64.0 * expected_step
    assert find_latest(ckpts) == ckpts / "last"


def test_clean_stale_temp_restores_only_complete_old(tmp_path: Path) -> None:
    tok, ckpts = _tokenizer(tmp_path), tmp_path / "checkpoints"
    _save(ckpts / ".best.old-11", tok, step=3)
    _save(ckpts / ".best.old-12", tok, step=5)  # two complete copies: the higher step wins
    _save(ckpts / ".last.old-13", tok, step=4)
    (ckpts / ".last.old-13" / "manifest.json").unlink()  # half-deleted: not restorable
    _save(ckpts / "epoch-2", tok, step=2)
    _save(ckpts / ".epoch-2.old-14", tok, step=1)  # epoch-2 exists: the old copy is junk
    (ckpts / ".epoch-3.tmp-15").mkdir()
    (ckpts / ".epoch-1.del-16").mkdir()
    (ckpts / ".hidden-notes").mkdir()  # not ours: left alone
    assert clean_stale_temp(ckpts) == [ckpts / "best"]
    assert sorted(os.listdir(ckpts)) == [".hidden-notes", "best", "epoch-2"]
    assert read_manifest(ckpts / "best")["step"] == 5
    assert read_manifest(ckpts / "epoch-2")["step"] == 2
    assert clean_stale_temp(tmp_path / "missing") == []


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "run_config.json",
                                  "training_state.pt"])
def test_flipped_byte_names_the_file(tmp_path: Path, name: str) -> None:
    out = _save(tmp_path / "last", _tokenizer(tmp_path), run_config={"seed": 1})
    file = out / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out, with_training_state=True)
    assert str(e.value) == f"{file}: sha256 mismatch (file damaged)"


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    out = _save(tmp_path / "last", _tokenizer(tmp_path))
    size = (out / "model.safetensors").stat().st_size
    os.truncate(out / "model.safetensors", size - 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, manifest says \d+ \(file truncated"):
        load_checkpoint(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing \(listed in manifest\.json\)"):
        load_checkpoint(out)
    (out / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"last: incomplete checkpoint \(no manifest\.json\)"):
        load_checkpoint(out)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_pickle_payload_in_training_state_is_refused(tmp_path: Path) -> None:
    out = _save(tmp_path / "last", _tokenizer(tmp_path))
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "evil": _Payload(marker)}, out / "training_state.pt")
    _rewrite_manifest(out, "training_state.pt")
    with pytest.raises(CheckpointError, match=r"training_state\.pt: refused to load"):
        load_checkpoint(out, with_training_state=True)
    assert not marker.exists()
    assert load_checkpoint(out).state_dict["w"].sum().item() == 64.0  # weights alone still load
    # The payload is real: an unsafe loader would have run it.
    control = tmp_path / "control"
    with open(tmp_path / "control.pkl", "wb") as f:
        pickle.dump(_Payload(control), f)
    with open(tmp_path / "control.pkl", "rb") as f:
        pickle.load(f)  # noqa: S301 - deliberately unsafe, on our own harmless payload
    assert control.exists()


def test_bogus_safetensors_header(tmp_path: Path) -> None:
    out = _save(tmp_path / "last", _tokenizer(tmp_path))
    (out / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{not json" + b"\0" * 64)
    _rewrite_manifest(out, "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{out / 'model.safetensors'}: not a valid safetensors file"):
        load_checkpoint(out)


def test_non_finite_weights_refused(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path)
    out = _save(tmp_path / "last", tok, value=1.0, step=1)
    bad = {"w": torch.ones(8, 8), "h.0.bias": torch.tensor([0.0, float("nan")])}
    with pytest.raises(CheckpointError, match=r"model_state\['h\.0\.bias'\]: tensor contains NaN/inf"):
        save_checkpoint(out, model_state=bad, model_config={"model_type": "gpt"}, tokenizer_file=tok)
    assert load_checkpoint(out).state_dict["w"].sum().item() == 64.0
    assert os.listdir(tmp_path / "last") and sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(out / "model.safetensors"))
    _rewrite_manifest(out, "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w' contains NaN/inf"):
        load_checkpoint(out)


def test_training_state_must_be_plain_data(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"training_state\['rng'\]\['numpy'\]: a ndarray cannot go into"):
        save_checkpoint(tmp_path / "last", model_state={"w": torch.ones(2)}, model_config={"model_type": "gpt"},
                        tokenizer_file=tok, training_state={"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "last").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


@pytest.mark.parametrize(("big", "file"), [("weights", "model.safetensors"), ("state", "training_state.pt")])
def test_disk_full_leaves_previous_checkpoint(tmp_path: Path, big: str, file: str) -> None:
    tok, ckpts = _tokenizer(tmp_path), tmp_path / "checkpoints"
    _save(ckpts / "last", tok, value=1.0, step=1)
    proc = forked_cli.run(["-c", CHILD, str(ckpts / "last"), str(tok), str(256 * 1024), big], tmp_path,
                          {k: v for k, v in os.environ.items() if k != "LMFORGE_FAULT"}, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith(f"disk full while saving checkpoint {ckpts / 'last'} (writing {file}: ")
    assert "previous checkpoint is untouched" in proc.stdout
    assert os.listdir(ckpts) == ["last"]
    ck = load_checkpoint(ckpts / "last", with_training_state=True)
    assert (ck.training_state["step"], ck.state_dict["w"].sum().item()) == (1, 64.0)


def test_prune_epochs_numeric_order(tmp_path: Path) -> None:
    tok, ckpts = _tokenizer(tmp_path), tmp_path / "checkpoints"
    for n in [1, 2, 9, 10, 11]:
        _save(ckpts / f"epoch-{n}", tok, step=n)
    _save(ckpts / "last", tok, step=11)
    _save(ckpts / "best", tok, step=2)
    removed = prune_epochs(ckpts, keep=2)
    assert [p.name for p in removed] == ["epoch-1", "epoch-2", "epoch-9"]
    assert sorted(os.listdir(ckpts)) == ["best", "epoch-10", "epoch-11", "last"]
    assert prune_epochs(ckpts, keep=5) == []
    assert [p.name for p in prune_epochs(ckpts, keep=0)] == ["epoch-10", "epoch-11"]
    assert sorted(os.listdir(ckpts)) == ["best", "last"]
    with pytest.raises(ValueError, match="keep: must be >= 0"):
        prune_epochs(ckpts, keep=-1)


def test_find_latest_picks_highest_step(tmp_path: Path) -> None:
    tok, ckpts = _tokenizer(tmp_path), tmp_path / "checkpoints"
    assert find_latest(ckpts) is None
    _save(ckpts / "epoch-9", tok, step=90)
    _save(ckpts / "epoch-10", tok, step=100)
    _save(ckpts / "last", tok, step=95)
    _save(ckpts / "best", tok, step=500)  # best is not a resume point
    (ckpts / "epoch-20").mkdir()  # incomplete: no manifest
    _save(ckpts / ".last.tmp-999", tok, step=400)  # looks complete but is a temp folder
    assert find_latest(ckpts) == ckpts / "epoch-10"
    _save(ckpts / "last", tok, step=100)
    assert find_latest(ckpts) == ckpts / "last"  # tie goes to last
    (ckpts / "last" / "manifest.json").write_text("{broken")
    assert find_latest(ckpts) == ckpts / "epoch-10"
