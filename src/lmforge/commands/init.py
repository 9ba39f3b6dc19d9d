"""`lmforge init`: write a copy of a shipped example run config to start a run from.

`lmforge init lm` (or mlm, classify, dialogue, or an example's name such as spam-minilm)
writes `<name>.yaml` to the current folder; `lmforge init` lists the examples. The examples
themselves are `lmforge.base.config_examples`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.base.config_examples import (EXAMPLE_HINT, TASK_EXAMPLES, example_text, list_examples,
                                          resolve_example)

__all__ = ["EXAMPLE_HINT", "TASK_EXAMPLES", "init_command", "list_examples", "write_example_config"]


def write_example_config(task_or_name: str, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the example config for a task (lm, mlm, classify, dialogue) or an example's name to
    `out` (default `<name>.yaml` in the current folder; a folder, or a path ending in "/", gets
    `<name>.yaml` inside it) and return its path. An existing file is kept unless `overwrite`;
    an unknown name is a ValueError listing the valid ones and the nearest match."""
    name = resolve_example(task_or_name)
    target = Path(f"{name}.yaml") if out is None else Path(out)
    if target.is_dir() or str(out).endswith(("/", os.sep)):  # "configs/": a folder, even a new one
        target = target / f"{name}.yaml"
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out}: {blocking} is a file, not a folder; choose another place")
    # The copy's comments say how to train it: name the copy, not the repository's configs/.
    text = example_text(name).replace(f"configs/{name}.yaml", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "w" if overwrite else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ValueError(f"{target} already exists; keep it, write elsewhere with --out PATH, "
                         f"or replace it with --overwrite") from None
    return target


def init_command(task_or_name: str | None, out: str | Path | None = None, *, overwrite: bool = False) -> int:
    """The CLI command: list the examples (no name), or write one and say what comes next."""
    if task_or_name is None:
        examples = list_examples()
        width = max(len(name) for name, _ in examples)
        print("example run configs (`lmforge init NAME`; a task picks its default: "
              + ", ".join(f"{task} = {name}" for task, name in TASK_EXAMPLES.items()) + "):")
        for name, description in examples:
            print(f"  {name:<{width}}  {description}")
        return 0
    path = write_example_config(task_or_name, out, overwrite=overwrite)
    print(f"wrote {path}: its first lines prepare the data; then `lmforge train {path}`")
    return 0
