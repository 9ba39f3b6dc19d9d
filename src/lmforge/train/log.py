"""Run logging: the `|`-separated console line, train.log, and metrics.jsonl (one event per line)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
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
        """A line for the console (unless quiet) and train.log."""
        if self.enabled and not self.quiet:
            tqdm.write(text, file=sys.stdout)
        self.note(text)

    def note(self, text: str) -> None:
        """A line for train.log alone (what the caller already told the user, or chose not to)."""
        if self.enabled:
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


@dataclass
class Interval:
    """What the next train event covers: metrics summed since the last one, tokens, the examples
    count at its start, and when it started (the loop leaves evaluating and saving out of its time)."""

    start: float
    examples: int
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, tokens: int, sums: dict[str, float]) -> None:
        self.tokens += tokens
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value


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


def last_end(run_dir: Path) -> dict | None:
    """The last "end" event of the run's metrics.jsonl (None: the run never ended, or no file)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and record.get("event") == "end":
            return record
    return None


def format_train_line(step: int, total: int, epoch: float, loss: float, accuracy: float | None,
                      lr: float, rate: float, mfu: float | None, eta_s: float,
                      extras: dict[str, float] | None = None, unit: str = "tok") -> str:
    """The console / train.log line of a train event. `rate` is the throughput in the task's
    `throughput_unit` per second (tok/s; classify ex/s, mlm pairs/s); `extras` are the task's
    `console_extras`."""
    parts = [f"step {step}/{total}", f"epoch {epoch:.2f}", f"loss {loss:.4f}"]
    if accuracy is not None:
        parts.append(f"acc {accuracy:.1%}")
    parts += [f"{k} {v:.4f}" for k, v in (extras or {}).items()]
    parts.append(f"lr {lr:.2e}")
    parts.append(f"{rate:,.0f} tok/s" if unit == "tok" else f"{_rate(rate)} {unit}/s")
    if mfu is not None:
        parts.append(f"MFU {mfu:.1%}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def format_eval_line(kind: str, step: int, result: dict[str, float], perplexity: bool,
                     extras: dict[str, float], on_train: dict[str, float] | None = None) -> str:
    """The console / train.log line of an evaluation: validation loss (perplexity where the task
    reports it), accuracy, the task's extras, and the same on training batches when given."""
    line = (f"{kind} step {step} | val loss {result['loss']:.4f}"
            + (f" | ppl {result['perplexity']:.2f}" if perplexity else "")
            + (f" | acc {result['accuracy']:.1%}" if "accuracy" in result else "")
            + "".join(f" | {k} {v:.4f}" for k, v in extras.items()))
    if on_train is not None:
        line += f" | train loss {on_train['loss']:.4f} | train acc {on_train['accuracy']:.1%}"
    return line


def throughput(unit: str, tokens: float, samples: float, seconds: float) -> dict[str, float]:
    """An interval's rates for metrics.jsonl: tokens_per_s always (MFU counts tokens), and
    "<unit>_per_s" for a task whose `throughput_unit` counts samples."""
    seconds = max(1e-9, seconds)
    rates = {"tokens_per_s": tokens / seconds}
    if unit != "tok":
        rates[f"{unit}_per_s"] = samples / seconds
    return rates


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
