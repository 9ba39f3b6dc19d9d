"""The mlm task: MLM and NSP losses go down on a small corpus; a run resumes exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmforge.base.config import load_config
from lmforge.data.prepare import prepare
from lmforge.models.registry import architecture, model_from_architecture
from lmforge.base.tokenizer import train_tokenizer
from lmforge.checkpoint import load_checkpoint
from lmforge.train.log import without_clock
from lmforge.train.loop import train
from lmforge.train.tasks import add_sums, make_task, sums_to_floats


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> Path:
    """Paragraphs of 3-6 sentences whose words come from one of 6 topics: NSP is learnable."""
    root = tmp_path_factory.mktemp("task_mlm")
    rng = random.Random(0)
    topics = [[f"{name}{i}" for i in range(8)] for name in ("apple", "river", "stone", "cloud", "metal", "glass")]
    paragraphs = []
    for _ in range(80):
        words = rng.choice(topics)
        paragraphs.append(" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 7))) + "."
                                   for _ in range(rng.randint(3, 6))))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=120, out_dir=root / "tok", show_progress=False)
    prepare("mlm", [corpus], tok, root / "data", val_fraction=0.1, seed=1, show_progress=False)
    return root / "data"


def _config(data: Path, out: Path, **train_kw):
    settings = {"task": "mlm", "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 2, "eval_every": 4,
                "eval_batches": 2, "seed": 7, "save_every": 2}
    settings.update(train_kw)
    return load_config(None, base={
        "model": {"kind": "bert", "preset": None, "n_layer": 2, "n_head": 2, "n_embd": 32, "context": 24},
        "data": {"path": str(data)}, "train": settings, "run": {"out_dir": str(out), "name": "mlm"}})


def test_mlm_and_nsp_losses_go_down(mlm_data: Path, tmp_path: Path):
    """16 fixed sentence pairs, masks drawn anew every step: both losses fall as the model learns them."""
    cfg = _config(mlm_data, tmp_path)
    meta = json.loads((mlm_data / "meta.json").read_text())
    torch.manual_seed(0)
    model = model_from_architecture(architecture(cfg.model, meta["vocab_size"]))
    task = make_task(cfg, meta, model.config.context)
    pairs = [task.dataset("train")[i] for i in range(16)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    history = []
    for _ in range(80):
        stats = task.loss_and_metrics(model, task.collate(pairs))
        (stats.loss_sum / stats.targets).backward()
        optimizer.step()
        optimizer.zero_grad()
        sums: dict = {}
        add_sums(sums, stats)
        history.append(task.summarize(sums_to_floats(sums)))
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    last = {k: sum(h[k] for h in history[-10:]) / 10 for k in history[0]}
    assert abs(first["loss"] - (first["mlm_loss"] + first["nsp_loss"])) < 1e-4
    assert last["mlm_loss"] < first["mlm_loss"] - 1.0, (first, last)
    assert last["nsp_loss"] < first["nsp_loss"] - 0.2, (first, last)
    assert last["nsp_accuracy"] > 0.8 and last["mlm_accuracy"] > first["mlm_accuracy"] + 0.05


def test_train_logs_mlm_metrics_and_resumes_exactly(mlm_data: Path, tmp_path: Path, monkeypatch):
    whole = train(_config(mlm_data, tmp_path / "a", max_steps=12, batch_size=32), quiet=True)
    events = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "train"][-1]
    assert {"mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "pairs_per_s", "tokens_per_s"} <= set(logged)
    # the console / train.log line shows sentence pairs/s where lm shows tok/s
    lines = [line for line in map(without_clock, (whole.run_dir / "train.log").read_text().splitlines())
             if line.startswith("step ")]
    assert lines and all(" pairs/s | " in line and "tok/s" not in line for line in lines), lines
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and "nsp_accuracy" in evals[-1]

    class Killed(Exception):
        pass

    def kill_after_step_11(name: str, detail=None) -> None:
        if name == "after_step_11":
            raise Killed

    cfg = _config(mlm_data, tmp_path / "b", max_steps=12, batch_size=32)
    monkeypatch.setattr("lmforge.train.loop.fault_point", kill_after_step_11)
    with pytest.raises(Killed):
        train(cfg, quiet=True)
    monkeypatch.undo()
    resumed = train(cfg, resume_from=tmp_path / "b" / "mlm" / "checkpoints" / "last", quiet=True)
    a = load_checkpoint(whole.run_dir / "checkpoints" / "last").state_dict
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last").state_dict
    for name in a:
        assert torch.equal(a[name], b[name]), name
