"""Run report: metrics.jsonl (+ config.yaml) -> plots/*.png|pdf and one self-contained report.html.

Reads only the run folder's metrics.jsonl and config.yaml; training never calls this package.
`metrics_file` reads the run folder, `plots` draws the figures, `page` writes the HTML.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.report.metrics_file import load_config, load_metrics, lookup, task_of
from lmforge.report.page import render_html
from lmforge.report.plots import write_plots

__all__ = ["load_metrics", "write_report"]


def write_report(run_dir: Path) -> Path:
    """Write run_dir/plots/*.png (+ .pdf) and run_dir/report.html; return the HTML path.

    Reads only run_dir/metrics.jsonl and, when present, run_dir/config.yaml.
    """
    run_dir = Path(run_dir)
    events = load_metrics(run_dir / "metrics.jsonl")
    config_text, config = load_config(run_dir / "config.yaml")
    unit = "examples" if task_of(config) == "classify" else "tokens"
    plots = write_plots(events, unit, run_dir / "plots")
    name = lookup(config, "run", "name") or lookup(config, "name") or run_dir.resolve().name
    page = render_html(str(name), events, config_text, plots)
    out = run_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
