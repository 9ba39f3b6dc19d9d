"""Regression on the classify task: prepare --regression stores float targets, model.num_labels 1
trains with MSE, evaluation reports MAE / RMSE / Pearson r equal to numpy's on the same
predictions, the best checkpoint is picked by RMSE, classify prints values; mismatches are named."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from lmforge.api import Model, evaluate
from lmforge.base.config import load_config
from lmforge.base.tokenizer import train_tokenizer
from lmforge.checkpoint import load_model, read_manifest
from lmforge.commands.classify import classify_command
from lmforge.data.prepare_classify import prepare_classify
from lmforge.data.store import TokenStore, read_meta
from lmforge.inference.loaded import load_for_inference
from lmforge.models.heads import is_regression
from lmforge.train.loop import train
from lmforge.train.task_regress import RegressTask
from lmforge.train.tasks import Task, make_task

SMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sms_spam" / "SMSSpamCollection"


def sms_lengths(folder: Path, n: int = 150) -> Path:
    """Real SMS texts with a learnable number each: the message's word count / 10."""
    rows = []
    for line in SMS.read_text(encoding="utf-8").splitlines()[:n]:
        text = line.split("\t", 1)[1]
        rows.append(json.dumps({"text": text, "score": round(len(text.split()) / 10, 2)}))
    path = folder / "sms_lengths.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reg_data(tmp_path_factory) -> tuple[Path, Path]:
    if not SMS.is_file():
        pytest.skip(f"{SMS} not present")
    root = tmp_path_factory.mktemp("reg_data")
    source = sms_lengths(root)
    tok = train_tokenizer([source], kind="bpe", vocab_size=300, out_dir=root / "tok", text_column="text",
                          show_progress=False)
    prepare_classify([source], tok, root / "data", label_column="score", regression=True, show_progress=False)
    return root / "data", source


def reg_run(data: Path, out: Path, **train_opts) -> dict:
    settings = {"task": "classify", "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 5,
                "eval_every": 8, "eval_batches": 2, "max_steps": 24, "seed": 3, "weight_decay": 0.0,
                "eval_at_start": True}
    settings.update(train_opts)
    return {"model": {**TINY_MODEL, "num_labels": 1}, "data": {"path": str(data)}, "train": settings,
            "run": {"out_dir": str(out), "name": "reg"}}


def test_prepare_regression_stores_float32_targets_and_says_so(reg_data):
    data, source = reg_data
    meta = read_meta(data)
    assert meta["problem_type"] == "regression" and meta["label_dtype"] == "float32"
    assert meta["label_names"] is None and meta["target_column"] == "score"
    wanted = sorted(json.loads(line)["score"] for line in source.read_text().splitlines())
    stored = []
    for split in ("train", "val", "test"):
        store = TokenStore(data, split)
        assert store.labels.dtype == np.dtype("<f4") and len(store.labels) == meta["splits"][split]["samples"]
        assert meta["splits"][split]["target_mean"] == pytest.approx(float(np.mean(store.labels)), rel=1e-6)
        stored += store.labels.tolist()
    np.testing.assert_allclose(sorted(stored), wanted, rtol=1e-6)  # every target once, as float32


def test_regression_trains_with_mse_and_reports_metrics_equal_to_numpy(reg_data, tmp_path, capsys):
    data, _ = reg_data
    result = train(load_config(None, base=reg_run(data, tmp_path)))
    out = capsys.readouterr().out
    ev = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in ev if e["event"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses  # the MSE falls
    evals = [e for e in ev if e["event"] in ("eval", "epoch") and e["split"] == "val"]
    assert evals[0]["step"] == 0 and evals[-1]["loss"] < 0.6 * evals[0]["loss"], evals  # untrained, then trained
    assert evals and all({"mae", "rmse", "pearson"} <= set(e) and "accuracy" not in e for e in evals)
    assert all(e["rmse"] == pytest.approx(e["loss"] ** 0.5) for e in evals)
    assert "| rmse " in out and "| pearson " in out
    assert "best val rmse" in [line for line in out.splitlines() if line.startswith("done:")][-1]
    best_step = min(evals, key=lambda e: e["rmse"])["step"]  # lower RMSE is better; the untrained step 0 competes too
    model, ckpt = load_model(result.run_dir / "checkpoints" / "best")
    assert is_regression(ckpt.model_config) and read_manifest(result.run_dir / "checkpoints" / "best")["step"] == best_step
    # the full test split's metrics (lmforge eval) against numpy on the same predictions
    store = TokenStore(data, "test")
    with torch.no_grad():
        predicted = np.array([float(model(torch.tensor(store[i][:32], dtype=torch.long)[None])[0, 0])  # context 32
                              for i in range(len(store))])
    target = np.asarray(store.labels, dtype=np.float64)
    metrics = evaluate(result.run_dir / "checkpoints" / "best", data, split="test", device="cpu")
    assert metrics["samples"] == len(store)
    assert metrics["mae"] == pytest.approx(np.abs(predicted - target).mean(), rel=1e-5)
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.square(predicted - target).mean()), rel=1e-5)
    assert metrics["loss"] == pytest.approx(np.square(predicted - target).mean(), rel=1e-5)
    assert metrics["pearson"] == pytest.approx(np.corrcoef(predicted, target)[0, 1], abs=1e-5)
    final = {e["split"]: e for e in ev if e["event"] == "final"}
    assert final["test"]["rmse"] == pytest.approx(metrics["rmse"], rel=1e-5)
    # classify prints one value per text; the library returns the same numbers
    texts = ["see you at the bus stop later tonight", "ok"]
    buf = io.StringIO()
    values = classify_command(buf, result.run_dir, texts, device="cpu")
    assert [float(line) for line in buf.getvalue().splitlines()] == pytest.approx(values, rel=1e-5)
    assert Model(load_for_inference(result.run_dir, "cpu")).classify(texts) == pytest.approx(values)


def test_a_label_that_is_not_a_number_is_named_with_its_line(reg_data, tmp_path):
    _, source = reg_data
    bad = tmp_path / "bad.jsonl"
    lines = source.read_text().splitlines()
    lines[6] = json.dumps({"text": "hello there", "score": "spam"})
    bad.write_text("\n".join(lines) + "\n")
    tok = reg_data[0] / "tokenizer.json"
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 7: label 'spam' is not a finite number"):
        prepare_classify([bad], tok, tmp_path / "out", label_column="score", regression=True, show_progress=False)
    with pytest.raises(ValueError, match="--labels is for class labels"):
        prepare_classify([source], tok, tmp_path / "out", label_column="score", regression=True,
                         labels=["a", "b"], show_progress=False)


def test_num_labels_must_fit_the_folder(reg_data, tmp_path):
    data, source = reg_data
    cfg = load_config(None, base=reg_run(data, tmp_path, max_steps=1))
    assert isinstance(make_task(cfg, read_meta(data), 32), RegressTask)
    assert not RegressTask.__abstractmethods__ and isinstance(RegressTask.__new__(RegressTask), Task)
    cfg.model.num_labels = 2
    with pytest.raises(ValueError, match="model.num_labels=2, but .* holds numeric targets"):
        make_task(cfg, read_meta(data), 32)
    # a categorical folder: num_labels 1 is refused by name
    cats = tmp_path / "cats.jsonl"
    cats.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40)))
    prepare_classify([cats], data / "tokenizer.json", tmp_path / "cats", show_progress=False)
    cfg = load_config(None, base=reg_run(tmp_path / "cats", tmp_path))
    with pytest.raises(ValueError, match=r"model.num_labels=1 is a regression head, but .* class labels \['a', 'b'\]"):
        make_task(cfg, read_meta(tmp_path / "cats"), 32)
