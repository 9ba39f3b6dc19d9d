"""Run logging: the `|`-separated console line, train.log, and metrics.jsonl (one event per line)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    """Writes human lines to the console and train.log, and events to metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, quiet: bool = False):
        self.enabled = enabled
        self.quiet = quiet
        self.start = time.perf_counter()
        self._log = self._metrics = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "train.log", "a", encoding="utf-8")
            self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if not self.quiet:
            tqdm.write(text, file=sys.stdout)
        self._log.write(text + "\n")
        self._log.flush()

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": kind, **{k: _jsonable(v) for k, v in fields.items()}}
        self._metrics.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        for handle in (self._log, self._metrics):
            if handle is not None:
                handle.close()


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume, drop events logged after the checkpoint's step, so the history has no duplicates."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= last_step and record.get("event") != "end":
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def format_train_line(step: int, total: int, epoch: float, loss: float, accuracy: float | None,
                      lr: float, tokens_per_s: float, mfu: float | None, eta_s: float,
                      extras: dict[str, float] | None = None) -> str:
    """The console / train.log line of a train event. `extras` come from the task's
    `console_extras`; one named "<unit>/s" (see `throughput_extra`) is the task's own throughput
    and is shown in place of tok/s (classify: ex/s, mlm: pairs/s)."""
    extras = dict(extras or {})
    rates = {k: extras.pop(k) for k in [k for k in extras if k.endswith("/s")]}
    parts = [f"step {step}/{total}", f"epoch {epoch:.2f}", f"loss {loss:.4f}"]
    if accuracy is not None:
        parts.append(f"acc {accuracy:.1%}")
    parts += [f"{k} {v:.4f}" for k, v in extras.items()]
    parts.append(f"lr {lr:.2e}")
    parts += [f"{_rate(v)} {k}" for k, v in rates.items()] or [f"{tokens_per_s:,.0f} tok/s"]
    if mfu is not None:
        parts.append(f"MFU {mfu:.1%}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def throughput_extra(unit: str, metrics: dict[str, float]) -> dict[str, float]:
    """For a task's `console_extras`: {"<unit>/s": rate} when the loop logged "<unit>_per_s" for
    this interval (the task's `throughput_unit`; in metrics.jsonl under that key), else {}
    (eval lines, or the tok unit, whose rate is tokens_per_s)."""
    key = f"{unit}_per_s"
    return {f"{unit}/s": metrics[key]} if key in metrics else {}


def _rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; the report treats null as missing
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value
