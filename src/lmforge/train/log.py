"""Run logging: the `|`-separated console line, train.log (each line after its clock time), and
metrics.jsonl (one event per line), whose events also reach the run's experiment trackers
(`lmforge.train.trackers`) when it has some."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from datetime import datetime
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
        self.trackers = None  # a RunTrackers fed with every event (rank 0)
        self._close_trackers = False
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
        """A line for train.log alone (what the caller already told the user, or chose not to),
        after the clock time (a text of several lines gets it once, on its first)."""
        if self.enabled:
            self._log.write(f"[{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")
            self._log.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """One metrics.jsonl event (and the trackers' metrics of it)."""
        if not self.enabled:
            return
        record = {"event": kind, **{k: _jsonable(v) for k, v in fields.items()}}
        self._metrics.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._metrics.flush()
        if self.trackers is not None:
            self.trackers.log_event(kind, record)

    def attach(self, trackers: Any, close_with_log: bool) -> None:
        """Feed `trackers` (a `lmforge.train.trackers.RunTrackers`) with every event from now on;
        close_with_log: this logger's `close` closes them too (else their owner does)."""
        self.trackers, self._close_trackers = trackers, close_with_log

    def close(self) -> None:
        for handle in (self._log, self._metrics):
            if handle is not None:
                handle.close()
        if self.trackers is not None and self._close_trackers:
            self.trackers.close()


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


CLOCK = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")
"""The clock time that starts every train.log line (`RunLogger.note`)."""


def without_clock(line: str) -> str:
    """A train.log line as the console showed it."""
    return CLOCK.sub("", line, count=1)


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
                      extras: dict[str, float] | None = None, unit: str = "tok",
                      memory: dict[str, float] | None = None) -> str:
    """The console / train.log line of a train event. `rate` is the throughput in the task's
    `throughput_unit` per second (tok/s; classify ex/s, mlm pairs/s); `extras` are the task's
    `console_extras`; `memory` is `device_memory`'s (a GPU's allocated / peak GiB)."""
    parts = [f"step {step}/{total}", f"epoch {epoch:.2f}", f"loss {loss:.4f}"]
    if accuracy is not None:
        parts.append(f"acc {accuracy:.1%}")
    parts += [f"{k} {v:.4f}" for k, v in (extras or {}).items()]
    parts.append(f"lr {lr:.2e}")
    parts.append(f"{rate:,.0f} tok/s" if unit == "tok" else f"{_rate(rate)} {unit}/s")
    if mfu is not None:
        parts.append(f"MFU {mfu:.1%}")
    if memory:
        parts.append(f"mem {memory['memory_allocated_gib']:.2f}/{memory['memory_peak_gib']:.2f} GiB")
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


def device_memory(device: Any) -> dict[str, float]:
    """On CUDA, the memory torch's allocator holds for tensors now and at its peak, in GiB (read
    from the allocator's counters: no wait for the device); elsewhere nothing."""
    if getattr(device, "type", None) != "cuda":
        return {}
    import torch

    gib = 1024 ** 3
    return {"memory_allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "memory_peak_gib": torch.cuda.max_memory_allocated(device) / gib}


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
