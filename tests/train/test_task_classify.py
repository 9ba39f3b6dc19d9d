"""Task classify through the loop: events, best checkpoint by val accuracy, final report, freezing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from lmforge.base.config import load_config
from lmforge.data.prepare_classify import prepare_classify
from lmforge.report import write_report
from lmforge.base.tokenizer import train_tokenizer
from lmforge.checkpoint import load_checkpoint
from lmforge.train.log import without_clock
from lmforge.train.loop import train

WORDS = "see you at the bus stop later ok lar going home now what time is dinner".split()
SPAMMY = "win free prize claim cash call now txt urgent".split()


def write_labelled(folder: Path, n: int = 150, seed: int = 0) -> Path:
    """A toy spam set: spam texts carry two spammy words, ham texts none."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = rng.sample(WORDS, 5)
        label = "spam" if i % 3 == 0 else "ham"
        if label == "spam":
            words[1:1] = rng.sample(SPAMMY, 2)
        lines.append(f"{label}\t{' '.join(words)}\n")
    path = folder / "sms.tsv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls_data")
    sms = write_labelled(root)
    tok = train_tokenizer([sms], kind="bpe", vocab_size=300, out_dir=root / "tok", text_column=1,
                          show_progress=False)
    prepare_classify([sms], tok, root / "data", fmt="sms", show_progress=False)
    return root / "data"


def cls_run(data: Path, out: Path, **train_opts) -> dict:
    settings = {"task": "classify", "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 5,
                "eval_every": 10, "eval_batches": 2, "epochs": 2, "seed": 3}
    settings.update(train_opts)
    return {"model": dict(TINY_MODEL), "data": {"path": str(data)}, "train": settings,
            "run": {"out_dir": str(out), "name": "cls"}}


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_classify_run_logs_train_and_val_evals_epochs_and_a_final_report(cls_data, tmp_path, capsys):
    result = train(load_config(None, base=cls_run(cls_data, tmp_path)))
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    ev = events(result.run_dir)
    # the console and train.log show examples/s (metrics.jsonl keeps tokens_per_s and ex_per_s)
    assert console and all(" ex/s | " in line and "tok/s" not in line for line in console), console
    train_lines = [line for line in map(without_clock, (result.run_dir / "train.log").read_text().splitlines())
                   if line.startswith("step ")]
    assert train_lines == console
    assert all({"tokens_per_s", "ex_per_s", "mfu"} <= set(e) for e in ev if e["event"] == "train")
    evals = [e for e in ev if e["event"] in ("eval", "epoch")]
    assert {e["split"] for e in evals} == {"train", "val"}
    epochs = [e for e in ev if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs if e["split"] == "val"] == [1.0, 2.0]
    assert all(e["examples"] == e["step"] * 8 for e in ev if "examples" in e)
    final = {e["split"]: e for e in ev if e["event"] == "final"}
    assert set(final) == {"train", "val", "test"}
    test = final["test"]
    assert test["labels"] == ["ham", "spam"] and sum(map(sum, test["confusion"])) == test["samples"] == 30
    assert test["accuracy"] >= 0.9  # the spammy words are easy to find
    assert set(test["per_class"]["spam"]) == {"precision", "recall", "f1", "support"}
    best = load_checkpoint(result.run_dir / "checkpoints" / "best")
    assert best.model_config["model_type"] == "classifier" and best.model_config["label_names"] == ["ham", "spam"]
    assert "backbone.transformer.wte.weight" in best.state_dict
    # best is the eval with the highest val accuracy (first one on ties)
    val = [e for e in evals if e["split"] == "val"]
    top = max(e["accuracy"] for e in val)
    assert (result.run_dir / "checkpoints" / "best" / "manifest.json").exists()
    step = json.loads((result.run_dir / "checkpoints" / "best" / "manifest.json").read_text())["step"]
    assert step == next(e["step"] for e in val if e["accuracy"] == top)
    log = (result.run_dir / "train.log").read_text()
    assert "confusion matrix (rows: true label, columns: predicted)" in log and "train acc" in log
    page = write_report(result.run_dir).read_text()
    assert "final test accuracy" in page
    assert all((result.run_dir / "plots" / f"{stem}.{ext}").exists()
               for stem in ("loss", "accuracy") for ext in ("png", "pdf"))


def test_trainable_head_changes_only_the_head_and_init_from_a_gpt_checkpoint(cls_data, tmp_path):
    base = train(load_config(None, base=cls_run(cls_data, tmp_path / "a", epochs=1, eval_every=1000)), quiet=True)
    # a classifier's backbone as the start of another fine-tune: only its head may change
    gpt = load_checkpoint(base.run_dir / "checkpoints" / "last")
    cfg = cls_run(cls_data, tmp_path / "b", epochs=1, trainable="head", eval_every=1000)
    cfg["model"] = {"init_from": str(base.run_dir / "checkpoints" / "last")}
    tuned = train(load_config(None, base=cfg), quiet=True)
    after = load_checkpoint(tuned.run_dir / "checkpoints" / "last").state_dict
    for name, value in gpt.state_dict.items():
        same = torch.equal(value, after[name])
        assert same == name.startswith("backbone."), name


def test_best_metric_val_loss_and_a_bad_trainable_are_checked(cls_data, tmp_path):
    from lmforge.base.config import ConfigError

    with pytest.raises(ConfigError, match="train.trainable"):
        load_config(None, base=cls_run(cls_data, tmp_path, trainable="last_blocks"))
    cfg = load_config(None, base=cls_run(cls_data, tmp_path, epochs=1, best_metric="val_loss"))
    result = train(cfg, quiet=True)
    val = [e for e in events(result.run_dir) if e["event"] in ("eval", "epoch") and e["split"] == "val"]
    step = json.loads((result.run_dir / "checkpoints" / "best" / "manifest.json").read_text())["step"]
    assert step == min(val, key=lambda e: e["loss"])["step"]
