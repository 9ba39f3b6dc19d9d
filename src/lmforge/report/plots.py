"""The report's figures: loss, learning rate, accuracy and one figure per group of task extras,
each as PNG and PDF, with the tokens (or examples) seen on a second x axis.

matplotlib is imported inside the drawing code so `import lmforge.report` stays cheap, and only
its object-oriented API (no pyplot) is used: no global figure state, no backend switching.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.report.metrics_file import STANDARD_KEYS, series, split_events

# (suffix, plot file stem, title, y label); keys matching none are grouped by their last "_" word.
_SUFFIX_GROUPS = (
    ("_loss", "losses_detail", "Loss by component", "loss"),
    ("_accuracy", "accuracy_detail", "Accuracy by component", "accuracy"),
    ("_per_s", "throughput_detail", "Throughput", "per second"),
)
_DPI = 110

if TYPE_CHECKING:
    import numpy as np


def unit_map(events: list[dict[str, Any]], unit: str, x: str = "step") -> tuple[np.ndarray, np.ndarray] | None:
    """Strictly increasing step -> tokens/examples points for the top axis, or None if too few."""
    import numpy as np

    steps, counts = series(events, unit, x)
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



def _extra_groups(events: list[dict[str, Any]]) -> dict[str, tuple[str, str, list[str]]]:
    """Plot stem -> (title, y label, keys) for numeric keys beyond the standard ones."""
    keys: list[str] = []
    for event in events:
        for key, value in event.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in STANDARD_KEYS and key not in keys:
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



def write_plots(events: list[dict[str, Any]], unit: str, plots_dir: Path) -> list[Path]:
    """Write every figure as PNG and PDF; return the PNG paths in page order."""
    train, val = split_events(events)
    # classify (as chapter 6 of the book): x is epochs, train and val both from the evaluations
    x = "epoch" if unit == "examples" else "step"
    axis = unit_map(events, unit, x)
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
        fig = _figure(title, ylabel, [(label, *series(evs, key, x)) for label, evs, key in lines],
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
