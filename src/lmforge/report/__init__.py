"""Run report: metrics.jsonl (+ config.yaml) -> plots/*.png|pdf and one self-contained report.html.

Owns reading the metrics log that train/log.py writes, the matplotlib figures and the HTML page.
Reads only the run folder's metrics.jsonl and config.yaml; training never calls this module.
matplotlib is imported inside the plotting code so `import lmforge.report` stays cheap, and only
its object-oriented API (no pyplot) is used: no global figure state, no backend switching.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.base.version import __version__

# Keys with a fixed meaning in metrics.jsonl; any other numeric key in train/eval/epoch events is a
# task extra (mlm_loss, nsp_accuracy, pairs_per_s, ...) and gets its own plot group.
_META_KEYS = {"event", "step", "epoch", "tokens", "examples", "time", "split"}
_STANDARD_KEYS = _META_KEYS | {
    "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "mfu", "perplexity",
    "reason", "best_val_loss", "samples",
}
# (suffix, plot file stem, title, y label); keys matching none are grouped by their last "_" word.
_SUFFIX_GROUPS = (
    ("_loss", "losses_detail", "Loss by component", "loss"),
    ("_accuracy", "accuracy_detail", "Accuracy by component", "accuracy"),
    ("_per_s", "throughput_detail", "Throughput", "per second"),
)
_DPI = 110

if TYPE_CHECKING:
    import numpy as np

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


def write_report(run_dir: Path) -> Path:
    """Write run_dir/plots/*.png (+ .pdf) and run_dir/report.html; return the HTML path.

    Reads only run_dir/metrics.jsonl and, when present, run_dir/config.yaml.
    """
    run_dir = Path(run_dir)
    events = load_metrics(run_dir / "metrics.jsonl")
    config_text, config = _load_config(run_dir / "config.yaml")
    unit = "examples" if _task(config) == "classify" else "tokens"
    plots = _write_plots(events, unit, run_dir / "plots")
    name = _lookup(config, "run", "name") or _lookup(config, "name") or run_dir.resolve().name
    page = _render_html(str(name), events, config_text, plots)
    out = run_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- reading helpers


def _load_config(path: Path) -> tuple[str | None, Any]:
    if not path.is_file():
        return None, None
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as e:
        warnings.warn(f"{path}: not valid YAML ({e}); shown as text, task unknown", stacklevel=3)
        return text, None


def _lookup(config: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _task(config: Any) -> str | None:
    return _lookup(config, "train", "task") or _lookup(config, "task")


def _num(value: Any) -> float | None:
    """A finite float, or None for missing / null / NaN / inf / non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(events: list[dict[str, Any]], key: str, x: str = "step") -> Series:
    """(steps, values) sorted by step (or by `x`, e.g. "epoch"); the last event at a step wins
    (a resumed run repeats steps)."""
    by_step: dict[float, float] = {}
    for event in events:
        step, value = _num(event.get(x)), _num(event.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _unit_map(events: list[dict[str, Any]], unit: str, x: str = "step") -> tuple[np.ndarray, np.ndarray] | None:
    """Strictly increasing step -> tokens/examples points for the top axis, or None if too few."""
    import numpy as np

    steps, counts = _series(events, unit, x)
    xs: list[float] = []
    ys: list[float] = []
    for s, c in zip(steps, counts):
        if not ys or c > ys[-1]:
            xs.append(s)
            ys.append(c)
    return (np.array(xs), np.array(ys)) if len(xs) >= 2 else None


def _interp(x: Any, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp with linear extrapolation past both ends (axis ticks fall outside the data)."""
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.interp(x, xp, fp)
    lo = fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.where(x < xp[0], lo, np.where(x > xp[-1], hi, y))


def _split_events(events: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    train = [e for e in events if e.get("event") == "train"]
    val = [e for e in events if e.get("event") in ("eval", "epoch") and e.get("split", "val") == "val"]
    return train, val


def _extra_groups(events: list[dict[str, Any]]) -> dict[str, tuple[str, str, list[str]]]:
    """Plot stem -> (title, y label, keys) for numeric keys beyond the standard ones."""
    keys: list[str] = []
    for event in events:
        for key, value in event.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in _STANDARD_KEYS and key not in keys:
                keys.append(key)
    groups: dict[str, tuple[str, str, list[str]]] = {}
    for key in keys:
        for suffix, stem, title, ylabel in _SUFFIX_GROUPS:
            if key.endswith(suffix):
                break
        else:
            tail = key.rsplit("_", 1)[-1] or key
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", tail) + "_detail"
            title, ylabel = tail, tail
        groups.setdefault(stem, (title, ylabel, []))[2].append(key)
    return groups


# ---------------------------------------------------------------- plots


def _write_plots(events: list[dict[str, Any]], unit: str, plots_dir: Path) -> list[Path]:
    """Write every figure as PNG and PDF; return the PNG paths in page order."""
    train, val = _split_events(events)
    # classify (as chapter 6 of the book): x is epochs, train and val both from the evaluations
    x = "epoch" if unit == "examples" else "step"
    axis = _unit_map(events, unit, x)
    on_train = [e for e in events if e.get("event") in ("eval", "epoch") and e.get("split") == "train"]
    measured = on_train if on_train and unit == "examples" else train
    acc_title = "Accuracy" if unit == "examples" else "Token accuracy"
    specs = [
        ("loss", "Loss", "cross-entropy loss", [("train", measured, "loss"), ("val", val, "loss")]),
        ("lr", "Learning rate", "learning rate", [("lr", train, "lr")]),
        ("accuracy", acc_title, "accuracy", [("train", measured, "accuracy"), ("val", val, "accuracy")]),
    ]
    for stem, (title, ylabel, keys) in _extra_groups(train + val).items():
        lines = []
        for key in keys:
            lines += [(f"train {key}", train, key), (f"val {key}", val, key)]
        specs.append((stem, title, ylabel, lines))

    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, title, ylabel, lines in specs:
        fig = _figure(title, ylabel, [(label, *_series(evs, key, x)) for label, evs, key in lines],
                      axis, unit, sci_y=(stem == "lr"), xlabel=x)
        png = plots_dir / f"{stem}.png"
        fig.savefig(png, dpi=_DPI)
        fig.savefig(plots_dir / f"{stem}.pdf")
        paths.append(png)
    return paths


def _figure(title: str, ylabel: str, lines: list[tuple[str, list[float], list[float]]],
            axis: tuple[np.ndarray, np.ndarray] | None, unit: str, sci_y: bool = False,
            xlabel: str = "step") -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, FuncFormatter

    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for i, (label, xs, ys) in enumerate(lines):
        if not xs:
            continue
        # Colour per metric; train solid, val dashed with markers (evals are sparse).
        color = f"C{(i // 2) % 10}" if len(lines) > 1 else "C0"
        is_val = label.startswith("val")
        ax.plot(xs, ys, label=label, color=color, linewidth=1.5,
                linestyle="--" if is_val else "-",
                marker="o" if is_val or len(xs) <= 10 else None, markersize=4)
        drawn += 1
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data logged", transform=ax.transAxes, ha="center", va="center",
                color="0.5")
        return fig
    if drawn > 1:
        ax.legend(loc="best")
    if sci_y:  # explicit exponents: an offset label ("1e-4") would collide with the top axis
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.1e}" if y else "0"))
    if axis is not None:
        xp, fp = axis
        top = ax.secondary_xaxis(
            "top", functions=(lambda x: _interp(x, xp, fp), lambda x: _interp(x, fp, xp))
        )
        top.set_xlabel(f"{unit} seen")
        top.xaxis.set_major_formatter(EngFormatter(sep=""))
    return fig


# ---------------------------------------------------------------- HTML


def _fmt(value: Any, kind: str = "g") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else html.escape(str(value))
    if not math.isfinite(value):
        return str(value)
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "pct":
        return f"{value:.2%}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "ppl":
        return f"{value:,.2f}"
    return f"{value:.4g}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _ppl(event: dict[str, Any]) -> float | None:
    ppl = _num(event.get("perplexity"))
    loss = _num(event.get("loss"))
    if ppl is None and loss is not None:
        ppl = math.exp(loss) if loss < 700 else math.inf
    return ppl


def _summary_rows(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    train, val = _split_events(events)
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)

    def last_of(key: str) -> float | None:
        values = [v for v in (_num(e.get(key)) for e in events) if v is not None]
        return max(values) if values else None

    rows = [
        ("steps", _fmt(last_of("step"), "int")),
        ("epochs", _fmt(last_of("epoch"), "g")),
        ("tokens seen", _fmt(last_of("tokens"), "int")),
        ("examples seen", _fmt(last_of("examples"), "int")),
        ("wall time", _fmt_duration(last_of("time"))),
        ("end reason", html.escape(str(end.get("reason"))) if end and end.get("reason")
         else "— (no end event: still running or interrupted)"),
    ]
    if train:
        t = train[-1]
        rows += [(f"last train loss (step {_fmt(t.get('step'), 'int')})", _fmt(t.get("loss"), "loss")),
                 ("last train accuracy", _fmt(t.get("accuracy"), "pct"))]
    scored = [(e, _num(e.get("loss"))) for e in val]
    scored = [(e, v) for e, v in scored if v is not None]
    if scored:
        best, best_loss = min(scored, key=lambda ev: ev[1])
        rows += [(f"best val loss (step {_fmt(best.get('step'), 'int')})", _fmt(best_loss, "loss")),
                 ("best val perplexity", _fmt(_ppl(best), "ppl"))]
    elif end is not None and _num(end.get("best_val_loss")) is not None:
        rows.append(("best val loss", _fmt(end.get("best_val_loss"), "loss")))
    if val:
        v = val[-1]
        rows += [(f"last val loss (step {_fmt(v.get('step'), 'int')})", _fmt(v.get("loss"), "loss")),
                 ("last val perplexity", _fmt(_ppl(v), "ppl")),
                 ("last val accuracy", _fmt(v.get("accuracy"), "pct"))]
        for key, value in v.items():
            if key not in _STANDARD_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                kind = "loss" if key.endswith("_loss") else "pct" if key.endswith("_accuracy") else "g"
                rows.append((f"last val {html.escape(key)}", _fmt(value, kind)))
    else:
        rows.append(("validation", "— (no eval events)"))
    for e in events:  # classify: full-split metrics at the end of training
        if e.get("event") == "final":
            split = html.escape(str(e.get("split")))
            rows += [(f"final {split} accuracy", _fmt(e.get("accuracy"), "pct")),
                     (f"final {split} macro F1", _fmt(e.get("macro_f1"), "g"))]
    return rows


def _samples_html(events: list[dict[str, Any]]) -> str:
    latest = next((e for e in reversed(events)
                   if e.get("event") == "samples" and isinstance(e.get("samples"), list)), None)
    if latest is None:
        return ""
    items = []
    for sample in latest["samples"]:
        if not isinstance(sample, dict):
            continue
        prompt, text = str(sample.get("prompt") or ""), str(sample.get("text") or "")
        items.append(f'<pre class="sample"><b>{html.escape(prompt)}</b>{html.escape(text)}</pre>')
    step = _fmt(latest.get("step"), "int")
    return f"<h2>Samples (step {step})</h2>\n" + "\n".join(items)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; min-width: 26rem; }
td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem; }
td:last-child { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 6px; padding: 0.8rem;
      overflow-x: auto; white-space: pre-wrap; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
summary h2 { display: inline; } pre.config { max-height: 24rem; overflow-y: auto; }
figcaption { color: #666; font-size: 0.85rem; text-align: center; }
"""


def _render_html(name: str, events: list[dict[str, Any]], config_text: str | None,
                 plots: list[Path]) -> str:
    rows = "\n".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in _summary_rows(events))
    figures = []
    for png in plots:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        stem = html.escape(png.stem)
        figures.append(f'<figure><img alt="{stem}" src="data:image/png;base64,{data}">'
                       f"<figcaption>plots/{stem}.png</figcaption></figure>")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(name)} — lmforge report</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(name)}</h1>",
        f'<p class="meta">lmforge {__version__} run report, generated '
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        None if config_text is None else
        f"<details open><summary><h2>Resolved config</h2></summary>\n"
        f'<pre class="config">{html.escape(config_text)}</pre></details>',
        f"<h2>Final metrics</h2>\n<table>\n{rows}\n</table>",
        '<h2>Plots</h2>\n<div class="plots">\n' + "\n".join(figures) + "\n</div>",
        _samples_html(events),
    ]
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)
