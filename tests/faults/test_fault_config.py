"""A run config that would train something wrong, or somewhere wrong, is refused before any work:
non-finite numbers, run names that leave the runs folder, files that are not UTF-8, a context
longer than the data. Each error names the dotted key or the file, and nothing is written."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml

import faultkit as fk
from faultkit import data_fixture  # noqa: F401  (fixtures)
from lmforge.base import config_schema


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _float_keys() -> list[str]:
    """Every dotted key whose type holds a float (`float` or `float | None`)."""
    keys = []
    for section, cls in typing.get_type_hints(config_schema.Config).items():
        for name, hint in typing.get_type_hints(cls).items():
            if hint is float or float in typing.get_args(hint):
                keys.append(f"{section}.{name}")
    assert {"train.lr", "train.grad_clip", "model.dropout"} <= set(keys)
    return keys


def test_every_float_key_refuses_inf_and_nan(data: Path, tmp_path: Path):
    cfg = fk.run_config(data, tmp_path, "nonfinite", max_steps=1)
    before = _files(tmp_path)
    keys = _float_keys()
    for values in (["inf", "nan"], ["-inf", ".nan"]):  # override spellings; YAML's .inf below
        overrides = [f"{key}={values[i % 2]}" for i, key in enumerate(keys)]
        code, message = fk.run_cli(["train", str(cfg), *overrides, "--quiet"])
        assert code == 2 and "Traceback" not in message, message
        assert f"{len(keys)} problem(s)" in message, message
        for key in keys:
            assert f"{key}: must be a finite number" in message, (key, message)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["lr"] = float("inf")
    yaml_cfg = tmp_path / "yaml_inf.yaml"
    yaml_cfg.write_text(yaml.safe_dump(raw))
    assert "lr: .inf" in yaml_cfg.read_text()
    before.add(yaml_cfg)
    code, message = fk.run_cli(["train", str(yaml_cfg), "--quiet"])
    assert code == 2 and "train.lr: must be a finite number, got inf" in message, message
    assert _files(tmp_path) == before  # stopped before any work


@pytest.mark.parametrize("name", ["..", ".", "../escaped", "/tmp/absolute", "a/../..", "a\\b"])
def test_run_name_cannot_leave_the_runs_folder(data: Path, tmp_path: Path, monkeypatch, name: str):
    """`run.name=..` used to train into run.out_dir's parent (here the working directory)."""
    monkeypatch.chdir(tmp_path)
    cfg = fk.run_config(data, tmp_path / "runs", "base", max_steps=1)
    before = _files(tmp_path)
    code, message = fk.run_cli(["train", str(cfg), f"run.name={name}", "--quiet"])
    assert code == 2 and "Traceback" not in message, message
    assert f"run.name: {name!r}: must be one folder name" in message and "run.out_dir" in message, message
    assert _files(tmp_path) == before


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_config_file_not_utf8_is_an_error_naming_the_file(data: Path, tmp_path: Path, encoding: str):
    text = f"# caf\u00e9 run\ndata:\n  path: {data}\nrun:\n  out_dir: {tmp_path}\n  name: enc\n"
    cfg = tmp_path / f"{encoding}.yaml"
    cfg.write_bytes(text.encode(encoding))
    code, message = fk.run_cli(["train", str(cfg), "--quiet"])
    assert code == 2 and "Traceback" not in message, message
    assert str(cfg) in message and "UTF-8" in message and "iconv" in message, message
    assert ("line 1: not valid UTF-8" if encoding == "latin-1" else "the file is UTF-16") in message
    assert not (tmp_path / "enc").exists()


def test_context_longer_than_the_data_names_model_context(data: Path, tmp_path: Path):
    """A packed LM sample is model.context tokens: a context longer than the training split gives
    no sample at all, and the fix is a smaller model.context, not a smaller batch."""
    train_tokens = json.loads((data / "meta.json").read_text())["splits"]["train"]["tokens"]
    cfg = fk.run_config(data, tmp_path, "long", max_steps=1)
    code, message = fk.run_cli(["train", str(cfg), "model.context=100000", "--quiet"])
    assert code == 2 and "Traceback" not in message, message
    assert "model.context" in message and "100000" in message.replace(",", ""), message
    assert str(train_tokens) in message.replace(",", ""), message  # the limit: the split's tokens
    assert not (tmp_path / "long" / "checkpoints").exists()

