"""The example run configs shipped inside the package (`lmforge/configs/*.yaml`): their names,
one-line descriptions, the default example of each task, and their text.

Read through importlib.resources, so they are there in an installed wheel as in a checkout
(where the repository's `configs` is a link to `src/lmforge/configs`). Writing a copy is
`lmforge init` (`lmforge.commands.init`).
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; only for the annotation

# The example `lmforge init TASK` writes for each task (train.task of that file).
TASK_EXAMPLES: dict[str, str] = {"lm": "gpt-shakespeare", "mlm": "bert-wikitext", "classify": "spam-gpt",
                                 "dialogue": "dailydialog-en"}

EXAMPLE_HINT = (f"write an example with `lmforge init lm` (tasks: {', '.join(TASK_EXAMPLES)}; "
                "`lmforge init` lists every example)")


def _folder() -> Traversable:
    return resources.files("lmforge") / "configs"


def example_names() -> list[str]:
    """Every shipped example, by name (the file name without `.yaml`), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in _folder().iterdir() if p.name.endswith(".yaml"))


def _description(text: str) -> str:
    """The first comment line of the file: its one-line description."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_examples() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped example, sorted by name."""
    return [(name, _description(example_text(name))) for name in example_names()]


def resolve_example(task_or_name: str) -> str:
    """The example's name for a task (lm, mlm, classify, dialogue) or an example's name (with or
    without `.yaml`); ValueError listing the valid ones and the nearest match otherwise."""
    key = task_or_name.strip()
    key = TASK_EXAMPLES.get(key, key.removesuffix(".yaml"))
    names = example_names()
    if key in names:
        return key
    near = difflib.get_close_matches(task_or_name, [*TASK_EXAMPLES, *names], n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"no example config {task_or_name!r}{hint} (tasks: {', '.join(TASK_EXAMPLES)}; "
                     f"examples: {', '.join(names)})")


def missing_config_hint(path: Path) -> str:
    """What to say when the config file `path` does not exist: an example of that name is one
    `lmforge init` away (an installed lmforge has no configs/ folder), else EXAMPLE_HINT."""
    name = Path(path).name.removesuffix(".yaml")
    if name in example_names():
        return f"`lmforge init {name} --out {path}` writes the example of that name there"
    return EXAMPLE_HINT


def example_text(name: str) -> str:
    """The YAML text of the example `name` (a name from `example_names`)."""
    return (_folder() / f"{name}.yaml").read_text(encoding="utf-8")
