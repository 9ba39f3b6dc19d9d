"""`lmforge config` lists every key with its default and meaning; `--yaml` is a config that loads
back to the defaults; `lmforge train --print-config` prints the resolved config and trains nothing."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run
from lmforge.base.config import Config, load_config
from lmforge.cli import main
from lmforge.commands.config import config_keys, describe_keys


def _leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_key_is_listed_with_its_default_type_and_meaning(capsys):
    keys = config_keys()
    assert [k.key for k in keys] == _leaf_keys()
    assert all(k.doc for k in keys), [k.key for k in keys if not k.doc]  # every key says what it means
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.0006    (number)\n    Peak learning rate." in out
    assert "train.loggers = []    (list of text)" in out and "train.eval_at_start = false    (true/false)" in out
    assert "train.precision = fp32    (one of: fp32, bf16, fp16)" in out
    assert "train.max_steps = null    (int or null)" in out
    assert all(f"\n{key} = " in "\n" + out for key in _leaf_keys())
    assert main(["config", "train.lr"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "train.lr = 0.0006    (number)"
    assert {line.split(" = ")[0] for line in describe_keys("run").splitlines() if " = " in line} == \
        {"run.name", "run.out_dir"}
    assert main(["config", "trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err


def test_the_yaml_listing_loads_back_to_the_defaults(capsys):
    assert main(["config", "--yaml"]) == 0
    text = capsys.readouterr().out
    assert "  # Peak learning rate. (number)\n  lr: 0.0006\n" in text
    raw = yaml.safe_load(text)
    raw["data"]["path"] = "d"
    assert load_config(None, base=raw) == load_config(None, ["data.path=d"])


def test_print_config_shows_the_resolved_config_and_trains_nothing(lm_data, tmp_path: Path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(lm_data, tmp_path / "runs", max_steps=3)))
    assert main(["train", str(path), "train.lr=1e-3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# resolved config of {path} train.lr=1e-3")
    printed = yaml.safe_load(out)
    assert printed == load_config(path, ["train.lr=1e-3"]).to_dict() and printed["train"]["lr"] == 1e-3
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
    # a preset's sizes are named in the header
    assert main(["train", str(path), "model.preset=tiny", "model.n_layer=null", "model.n_head=null",
                 "model.n_embd=null", "model.context=null", "--print-config"]) == 0
    assert "# model.preset tiny (gpt): n_layer 2, n_head 2, n_embd 64, context 128" in capsys.readouterr().out


def test_print_config_of_a_resumed_run_is_its_saved_config_with_the_overrides(lm_data, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    saved = load_config(None, base=tiny_run(lm_data, tmp_path / "runs", max_steps=3))
    (run / "config.yaml").write_text(yaml.safe_dump(saved.to_dict()))
    (run / "checkpoints").mkdir()
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--resume", str(run), "train.max_steps=9", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 9 and printed["train"]["lr"] == saved.train.lr
    assert sorted(p.name for p in run.rglob("*")) == before
    assert main(["train", "--print-config"]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path / "none"), "--print-config", "--bogus"])
