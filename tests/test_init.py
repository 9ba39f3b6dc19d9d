"""`lmforge init`: the shipped example configs, listed, resolved by task or name, written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lmforge.base.config import load_config
from lmforge.base.config_examples import EXAMPLE_HINT, TASK_EXAMPLES, example_names
from lmforge.commands.init import init_command, list_examples, write_example_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "src" / "lmforge" / "configs"


def test_every_shipped_example_is_listed_described_and_valid():
    names = [name for name, _ in list_examples()]
    assert names == sorted(p.stem for p in PACKAGED.glob("*.yaml")) and len(names) >= 6
    for name, description in list_examples():
        assert description and "\n" not in description and description.endswith("."), (name, description)
        load_config(PACKAGED / f"{name}.yaml")  # every example passes today's schema


def test_each_task_has_a_default_example_of_that_task():
    assert set(TASK_EXAMPLES) == {"lm", "mlm", "classify", "dialogue"}
    for task, name in TASK_EXAMPLES.items():
        assert name in example_names()
        assert yaml.safe_load((PACKAGED / f"{name}.yaml").read_text())["train"]["task"] == task
        assert "`lmforge init lm`" in EXAMPLE_HINT and task in EXAMPLE_HINT


def test_the_repository_configs_folder_is_the_packaged_one():
    """README commands (`lmforge train configs/X.yaml`) keep working from a checkout."""
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == PACKAGED.resolve()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for used in set(re.findall(r"configs/([\w.-]+\.yaml)", readme)) - {"x.yaml"}:
        assert (ROOT / "configs" / used).is_file(), used


@pytest.mark.parametrize("task", ["lm", "mlm", "classify", "dialogue", "spam-minilm", "chitchat-zh.yaml"])
def test_init_writes_the_example_to_the_current_folder(task: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = TASK_EXAMPLES.get(task, task.removesuffix(".yaml"))
    path = write_example_config(task, None)
    assert path == Path(f"{name}.yaml") and path.is_file()
    assert load_config(path).to_dict() == load_config(PACKAGED / f"{name}.yaml").to_dict()
    text = path.read_text(encoding="utf-8")
    assert f"configs/{name}.yaml" not in text  # the copy's comments name the copy
    if f"lmforge train configs/{name}.yaml" in (PACKAGED / f"{name}.yaml").read_text(encoding="utf-8"):
        assert f"lmforge train {name}.yaml" in text


def test_init_keeps_an_existing_file_unless_overwrite(tmp_path: Path):
    out = tmp_path / "mine.yaml"
    out.write_text("keep me\n")
    with pytest.raises(ValueError, match="mine.yaml already exists.*--overwrite"):
        write_example_config("lm", out)
    assert out.read_text() == "keep me\n"
    assert write_example_config("lm", out, overwrite=True) == out
    assert load_config(out).train.task == "lm"
    assert write_example_config("mlm", tmp_path) == tmp_path / "bert-wikitext.yaml"  # a folder: inside it
    assert write_example_config("classify", tmp_path / "new" / "c.yaml").is_file()  # parents made


def test_an_unknown_example_lists_the_valid_ones_and_the_nearest():
    with pytest.raises(ValueError) as err:
        write_example_config("shakespear", None)
    text = str(err.value)
    assert "'shakespear'" in text and "did you mean 'gpt-shakespeare'?" in text
    assert "lm, mlm, classify, dialogue" in text and "spam-minilm" in text


def test_init_command_lists_or_writes(tmp_path: Path, monkeypatch, capsys):
    assert init_command(None) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in example_names()) and "lm = gpt-shakespeare" in listing
    monkeypatch.chdir(tmp_path)
    assert init_command("dialogue") == 0
    assert "lmforge train dailydialog-en.yaml" in capsys.readouterr().out
