"""check_output_folder: outputs never eat their inputs, and --overwrite replaces only its own kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.base.outputs import check_output_folder, folder_kind


def _checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    return path


def _run(path: Path) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text("run: {}\n")
    return path


@pytest.mark.parametrize("relation", ["same", "parent", "child"])
def test_an_output_related_to_its_input_is_refused_even_with_overwrite(tmp_path: Path, relation: str):
    source = _checkpoint(tmp_path / "runs" / "cp" / "checkpoints" / "best")
    out = {"same": source, "parent": tmp_path / "runs", "child": source / "hf"}[relation]
    with pytest.raises(ValueError, match="destroy what is being read"):
        check_output_folder(out, inputs=[source], overwrite=True, kind="hf-model")


def test_an_existing_folder_needs_overwrite_and_the_same_kind(tmp_path: Path):
    run = _run(tmp_path / "run")
    assert folder_kind(run) == "run"
    with pytest.raises(ValueError, match=r"holds a run\); choose another folder, or pass --overwrite"):
        check_output_folder(run, kind="tokenizer")
    with pytest.raises(ValueError, match="holds a run, not a tokenizer"):
        check_output_folder(run, kind="tokenizer", overwrite=True)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    assert check_output_folder(tok, kind="tokenizer", overwrite=True) == tok


def test_a_new_or_empty_folder_is_fine_and_a_file_is_not(tmp_path: Path):
    assert check_output_folder(tmp_path / "new", kind="data") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", kind="data") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_folder(tmp_path / "file", kind="data")
