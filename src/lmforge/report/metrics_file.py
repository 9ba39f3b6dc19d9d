"""Reading a run folder for the report: metrics.jsonl (the events train/log.py writes) and
config.yaml, and the per-metric series the plots and the summary draw from them."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

# Keys with a fixed meaning in metrics.jsonl; any other numeric key in train/eval/epoch events is a
# task extra (mlm_loss, nsp_accuracy, pairs_per_s, ...) and gets its own plot group.
_META_KEYS = {"event", "step", "epoch", "tokens", "examples", "time", "split"}
STANDARD_KEYS = _META_KEYS | {
    "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "mfu", "perplexity",
    "reason", "best_val_loss", "samples",
}

Series = tuple[list[float], list[float]]


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file: one dict per valid line, in file order.

    Blank lines are ignored. A line that is not a JSON object (a crash mid-write leaves a truncated
    last line) is skipped with a warning naming the file and line number. NaN/Infinity literals
    (what `json.dumps` writes for non-finite floats) are accepted.
    Raises FileNotFoundError if the file is missing and ValueError if it holds no event.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: metrics file not found; pass a run folder written by `lmforge train`"
        )
    events: list[dict[str, Any]] = []
    skipped = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                event, why = None, f"not valid JSON: {e.msg}"
            else:
                why = "not a JSON object"
            if not isinstance(event, dict):
                warnings.warn(f"{path}:{lineno}: skipping malformed line ({why})", stacklevel=2)
                skipped += 1
                continue
            events.append(event)
    if not events:
        what = f"all {skipped} lines are malformed" if skipped else "the file is empty"
        raise ValueError(
            f"{path}: no metrics events ({what}); train the run first (`lmforge train`) "
            "or point the report at the right run folder"
        )
    return events


def load_config(path: Path) -> tuple[str | None, Any]:
    if not path.is_file():
        return None, None
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as e:
        warnings.warn(f"{path}: not valid YAML ({e}); shown as text, task unknown", stacklevel=3)
        return text, None


def lookup(config: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def task_of(config: Any) -> str | None:
    return lookup(config, "train", "task") or lookup(config, "task")


def num(value: Any) -> float | None:
    """A finite float, or None for missing / null / NaN / inf / non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(events: list[dict[str, Any]], key: str, x: str = "step") -> Series:
    """(steps, values) sorted by step (or by `x`, e.g. "epoch"); the last event at a step wins
    (a resumed run repeats steps)."""
    by_step: dict[float, float] = {}
    for event in events:
        step, value = num(event.get(x)), num(event.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]



def split_events(events: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    train = [e for e in events if e.get("event") == "train"]
    val = [e for e in events if e.get("event") in ("eval", "epoch") and e.get("split", "val") == "val"]
    return train, val
