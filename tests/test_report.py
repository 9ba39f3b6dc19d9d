"""Tests for lmforge.report: metrics.jsonl + config.yaml -> plots and a self-contained HTML page."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from lmforge.report import load_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 512


def _events(extras: bool = False) -> list[dict]:
    events = []
    for step in range(1, 41):
        base = {"step": step, "epoch": step / 20, "tokens": step * TOKENS_PER_STEP,
                "examples": step * 4, "time": step * 0.5}
        train = {"event": "train", **base, "loss": 8.0 - 0.1 * step, "accuracy": 0.01 * step,
                 "lr": 6e-4 * min(1.0, step / 10), "grad_norm": 1.0, "tokens_per_s": 1000.0,
                 "mfu": None}
        if extras:
            train.update(mlm_loss=6.0 - 0.1 * step, nsp_loss=0.7, mlm_accuracy=0.01 * step,
                         nsp_accuracy=0.5, pairs_per_s=50.0)
        events.append(train)
        if step % 10 == 0:
            val = {"event": "eval", **base, "split": "val", "loss": 7.5 - 0.1 * step,
                   "perplexity": math.exp(7.5 - 0.1 * step), "accuracy": 0.009 * step}
            if extras:
                val.update(mlm_loss=5.0, nsp_loss=0.69, mlm_accuracy=0.2, nsp_accuracy=0.55)
            events.append(val)
        if step == 20:
            events.append({"event": "epoch", **base, "split": "val", "loss": 5.6,
                           "perplexity": math.exp(5.6), "accuracy": 0.18})
    last = {"step": 40, "epoch": 2.0, "tokens": 40 * TOKENS_PER_STEP, "examples": 160, "time": 20.0}
    events.append({"event": "samples", **last, "samples": [
        {"prompt": "ROMEO:", "text": " <b>bold</b> & more"},
        {"prompt": "JULIET <i>", "text": "continuation only"},
    ]})
    events.append({"event": "end", **last, "reason": "max_steps", "best_val_loss": 3.5})
    return events


def _write_run(run_dir: Path, events: list[dict], config: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


def _check_png(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path
    height, width = mpimg.imread(path).shape[:2]
    return width, height


def test_report_writes_plots_and_self_contained_html(tmp_path: Path) -> None:
    config = "run:\n  name: shakespeare <test>\ntrain:\n  task: lm\n  lr: 0.0006\n"
    run = _write_run(tmp_path / "run", _events(), config)

    out = write_report(run)

    assert out == run / "report.html"
    stems = sorted(p.stem for p in (run / "plots").glob("*.png"))
    assert stems == ["accuracy", "loss", "lr"]  # no task extras in this run -> no detail plots
    for stem in stems:
        assert _check_png(run / "plots" / f"{stem}.png") == (880, 506)  # 8 x 4.6 in at 110 dpi
        assert (run / "plots" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"

    page = out.read_text()
    assert "<h1>shakespeare &lt;test&gt;</h1>" in page
    # Samples: prompt bold and escaped, then the continuation (the text after the prompt),
    # user text never raw HTML.
    assert "<pre class=\"sample\"><b>ROMEO:</b> &lt;b&gt;bold&lt;/b&gt; &amp; more</pre>" in page
    assert "<b>JULIET &lt;i&gt;</b>continuation only" in page
    assert "<b>bold</b>" not in page
    # Final metrics: best val loss = min(7.5 - 0.1*step over evals at 10..40, epoch 5.6) = 3.5.
    assert re.search(r"best val loss \(step 40\)</td><td>3\.5000<", page)
    assert re.search(r"last val loss \(step 40\)</td><td>3\.5000<", page)
    assert re.search(r"last train loss \(step 40\)</td><td>4\.0000<", page)
    assert f"<td>{40 * TOKENS_PER_STEP:,}</td>" in page
    assert "<td>max_steps</td>" in page
    assert "<td>20.0 s</td>" in page
    assert "<td>last val accuracy</td><td>36.00%</td>" in page
    # Config shown verbatim (escaped).
    assert "name: shakespeare &lt;test&gt;" in page
    # Self-contained: every image is an embedded PNG, nothing fetched from the network.
    images = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(images) == 3
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)
    assert "http://" not in page and "https://" not in page


def test_extra_metrics_get_detail_plots(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "bert", _events(extras=True), "train:\n  task: mlm\n")
    page = write_report(run).read_text()
    stems = {p.stem for p in (run / "plots").glob("*.png")}
    assert stems == {"loss", "lr", "accuracy", "losses_detail", "accuracy_detail", "throughput_detail"}
    _check_png(run / "plots" / "losses_detail.png")
    assert page.count("data:image/png;base64,") == 6
    assert "<td>last val mlm_loss</td><td>5.0000</td>" in page
    assert "<td>last val nsp_accuracy</td><td>55.00%</td>" in page


def test_run_without_eval_nan_values_and_no_config(tmp_path: Path) -> None:
    events = [{"event": "train", "step": s, "tokens": 64 * s, "loss": 3.0 / s, "lr": 1e-3}
              for s in range(1, 6)]
    events[2]["loss"] = float("nan")  # json.dumps writes NaN; the report must cope
    events.append({"event": "train", "step": 6, "loss": None, "accuracy": None})
    run = _write_run(tmp_path / "noeval", events)

    page = write_report(run).read_text()

    assert {p.stem for p in (run / "plots").glob("*.png")} == {"loss", "lr", "accuracy"}
    assert "no eval events" in page
    assert "Resolved config" not in page  # no config.yaml -> section omitted
    assert "no end event" in page
    assert "Samples" not in page


def test_classify_run_plots_by_epoch_and_reports_final_metrics(tmp_path: Path) -> None:
    from lmforge.report.plots import unit_map

    events = _events()
    for epoch in (1, 2):  # classify evaluates the train split too, once per epoch
        events.insert(-2, {"event": "epoch", "split": "train", "step": 20 * epoch, "epoch": float(epoch),
                           "examples": 80 * epoch, "loss": 0.5 / epoch, "accuracy": 0.8 + 0.05 * epoch})
    events.append({"event": "final", "split": "test", "step": 40, "epoch": 2.0, "loss": 0.3,
                   "accuracy": 0.875, "macro_f1": 0.8123, "confusion": [[3, 1], [0, 4]]})
    run = _write_run(tmp_path / "cls", events, "train:\n  task: classify\n")

    page = write_report(run).read_text()

    assert {p.stem for p in (run / "plots").glob("*.png")} == {"loss", "lr", "accuracy"}
    assert "<td>final test accuracy</td><td>87.50%</td>" in page
    assert "<td>final test macro F1</td><td>0.8123</td>" in page
    epochs, examples = unit_map(events, "examples", "epoch")
    assert list(epochs[:3]) == [0.05, 0.1, 0.15] and list(examples[:3]) == [4, 8, 12]


def test_malformed_line_is_skipped_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(e) for e in _events()[:3]]
    path.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n[1, 2]\n\n" + lines[2] + "\n")

    with pytest.warns(UserWarning) as record:
        events = load_metrics(path)

    assert len(events) == 3 and [e["step"] for e in events] == [1, 2, 3]
    messages = [str(w.message) for w in record]
    assert any(f"{path}:2:" in m for m in messages)
    assert any(f"{path}:4:" in m for m in messages)


def test_truncated_last_line_still_reports(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "crash", _events())
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 41, "lo')  # crash mid-write
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: skipping malformed line"):
        assert write_report(run).is_file()


def test_empty_metrics_raises_naming_file(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=re.escape(str(run / "metrics.jsonl")) + ".*empty"):
        write_report(run)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_metrics(tmp_path / "nothere" / "metrics.jsonl")
