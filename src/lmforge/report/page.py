"""The report's HTML page: one self-contained file with the resolved config, the final metrics,
the plots inlined as PNG data and the last samples; nothing is fetched from elsewhere."""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path
from typing import Any

from lmforge.base.version import __version__
from lmforge.report.metrics_file import STANDARD_KEYS, num, split_events


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
    ppl = num(event.get("perplexity"))
    loss = num(event.get("loss"))
    if ppl is None and loss is not None:
        ppl = math.exp(loss) if loss < 700 else math.inf
    return ppl


def _summary_rows(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    train, val = split_events(events)
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)

    def last_of(key: str) -> float | None:
        values = [v for v in (num(e.get(key)) for e in events) if v is not None]
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
    scored = [(e, num(e.get("loss"))) for e in val]
    scored = [(e, v) for e, v in scored if v is not None]
    if scored:
        best, best_loss = min(scored, key=lambda ev: ev[1])
        rows += [(f"best val loss (step {_fmt(best.get('step'), 'int')})", _fmt(best_loss, "loss")),
                 ("best val perplexity", _fmt(_ppl(best), "ppl"))]
    elif end is not None and num(end.get("best_val_loss")) is not None:
        rows.append(("best val loss", _fmt(end.get("best_val_loss"), "loss")))
    if val:
        v = val[-1]
        rows += [(f"last val loss (step {_fmt(v.get('step'), 'int')})", _fmt(v.get("loss"), "loss")),
                 ("last val perplexity", _fmt(_ppl(v), "ppl")),
                 ("last val accuracy", _fmt(v.get("accuracy"), "pct"))]
        for key, value in v.items():
            if key not in STANDARD_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
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


def render_html(name: str, events: list[dict[str, Any]], config_text: str | None,
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
