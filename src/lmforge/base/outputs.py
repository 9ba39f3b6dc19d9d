"""The one guard every command that writes a folder passes first.

An output may not be, contain, or sit inside any of its inputs (replacing it would delete
what is being read); an existing non-empty folder needs `overwrite`; and even with it, a folder
that holds a run, a data store or a checkpoint is only replaced by a folder of the same kind.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("run", "data", "checkpoint", "tokenizer", "hf-model")
_NAMES = {"run": "run", "data": "prepared data folder", "checkpoint": "checkpoint", "tokenizer": "tokenizer",
          "hf-model": "Hugging Face model"}


def folder_kind(path: Path) -> str | None:
    """What an existing folder holds: one of KINDS, None for anything else (or nothing)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists()):
        return "run"
    if (path / "manifest.json").is_file():
        return "checkpoint"
    if (path / "meta.json").is_file():
        return "data"
    if (path / "config.json").is_file():
        return "hf-model"
    if (path / "tokenizer.json").is_file():
        return "tokenizer"
    return None


def _related(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "sits inside"
    return None


def check_output_folder(out: Path | str, *, inputs: list[Path] | tuple[Path, ...] = (), overwrite: bool = False,
                        kind: str, flag: str = "--out") -> Path:
    """`out` as a Path if writing a `kind` folder there is safe, else ValueError saying why and what to do."""
    assert kind in KINDS, kind
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} exists and is a file; choose a folder")
    target = out.resolve()
    for source in inputs:
        relation = _related(target, Path(source).resolve())
        if relation:
            raise ValueError(f"{flag} {out} {relation} the input {source}: writing there would destroy what "
                             f"is being read; choose an output outside it")
    if not (out.is_dir() and any(out.iterdir())):
        return out
    found = folder_kind(out)
    if not overwrite:
        holds = f" (it holds a {_NAMES[found]})" if found else ""
        raise ValueError(f"{flag} {out} already exists and is not empty{holds}; choose another folder, "
                         f"or pass --overwrite (overwrite=True) to replace it")
    if found is not None and found != kind:
        raise ValueError(f"{flag} {out} holds a {_NAMES[found]}, not a {_NAMES[kind]}; --overwrite only "
                         f"replaces a folder of the same kind; choose another folder")
    return out
