"""The dialogue task: labels per loss_on, trimming to the context, accuracy, loss going down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.data.prepare import prepare
from lmforge.data.dialogue_format import RESPONSE, USER, split_turns
from lmforge.data.store import read_meta
from lmforge.base.metrics import IGNORE_INDEX, token_accuracy
from lmforge.models.registry import architecture, model_from_architecture
from lmforge.base.tokenizer import train_tokenizer
from lmforge.train.loop import train
from lmforge.train.tasks import make_task

PAIRS = [("你好", "你好呀"), ("吃饭了吗", "吃过了"), ("今天天气怎么样", "挺好的"), ("晚安", "晚安好梦"),
         ("你在干什么", "在上班呢"), ("好累啊", "早点休息吧")]


@pytest.fixture(scope="module")
def dialogue_data(tmp_path_factory) -> Path:
    """Short Chinese dialogues (2 to 4 turns), WordPiece, prepared for `dialogue`."""
    root = tmp_path_factory.mktemp("dialogue_data")
    blocks = []
    for i in range(120):
        a, b = PAIRS[i % len(PAIRS)], PAIRS[(i * 5 + 1) % len(PAIRS)]
        turns = [*a, *b][: 2 + i % 3]
        blocks.append("\n".join(turns))
    corpus = root / "chat.txt"
    corpus.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=120, out_dir=root / "tok",
                          min_frequency=1, show_progress=False)
    prepare("dialogue", [corpus], tok, root / "data", val_fraction=0.1, seed=1, show_progress=False)
    return root / "data"


def _task(data: Path, tmp_path: Path, context: int = 32, **train_settings):
    base = tiny_run(data, tmp_path, task="dialogue", **train_settings)
    base["model"]["context"] = context
    cfg = load_config(None, base=base)
    return make_task(cfg, read_meta(data), context)


def test_loss_on_responses_masks_exactly_the_user_tokens(dialogue_data: Path, tmp_path: Path):
    task = _task(dialogue_data, tmp_path)
    everything = _task(dialogue_data, tmp_path, loss_on="all").dataset("train")
    ds = task.dataset("train")
    sep = ds.sep
    checked = 0
    for i in range(len(ds)):
        item, ids_roles = ds[i], ds.sample(i)
        ids, labels = item["input_ids"], item["labels"]
        roles = torch.from_numpy(ids_roles[1])
        assert torch.equal(labels == IGNORE_INDEX, roles == USER)
        assert torch.equal(labels[roles == RESPONSE], ids[roles == RESPONSE])
        assert torch.equal(everything[i]["labels"], ids)  # loss_on: all learns every token
        turns, turn_roles = split_turns(ids.tolist(), roles.tolist(), sep)
        assert turn_roles == [k % 2 for k in range(len(turns))]  # user, reply, user, ...
        # the user's tokens and the [SEP] closing their turn: exactly the -100s after [CLS]
        user_tokens = sum(len(t) + 1 for t, r in zip(turns, turn_roles) if r == USER)
        assert int((labels[1:] == IGNORE_INDEX).sum()) == user_tokens
        checked += 1
    assert checked > 50


def test_long_dialogues_keep_recent_whole_turns_within_the_context(dialogue_data: Path, tmp_path: Path):
    task = _task(dialogue_data, tmp_path, context=12)
    ds = task.dataset("train")
    full = _task(dialogue_data, tmp_path, context=256).dataset("train")
    trimmed = 0
    for i in range(len(ds)):
        ids = ds[i]["input_ids"].tolist()
        whole = full[i]["input_ids"].tolist()
        assert len(ids) <= 12 and ids[0] == whole[0]
        if len(whole) > 12:
            trimmed += 1
            assert whole[len(whole) - len(ids) + 1:] == ids[1:]  # a suffix of the dialogue
            assert whole[len(whole) - len(ids)] == ds.sep  # that starts at a turn boundary
    assert trimmed > 0


def test_accuracy_is_calculate_acc_and_padding_is_ignored(dialogue_data: Path, tmp_path: Path):
    task = _task(dialogue_data, tmp_path)
    ds = task.dataset("train")
    batch = task.collate([ds[i] for i in range(8)])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == task.pad_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    torch.manual_seed(0)
    cfg = load_config(None, base=tiny_run(dialogue_data, tmp_path))
    model = model_from_architecture(architecture(cfg.model, read_meta(dialogue_data)["vocab_size"])).eval()
    stats = task.loss_and_metrics(model, batch)
    with torch.no_grad():  # the padded batch gives each dialogue's loss as if it were alone
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        alone = model(ds[0]["input_ids"][None])
    n = len(ds[0]["input_ids"])
    torch.testing.assert_close(logits[0, :n], alone[0], rtol=1e-4, atol=1e-5)
    assert float(stats.correct / stats.targets) == pytest.approx(token_accuracy(logits, batch["labels"]))
    assert int(stats.targets) == task.count_targets(batch)


def test_a_tiny_dialogue_model_learns(dialogue_data: Path, tmp_path: Path):
    base = tiny_run(dialogue_data, tmp_path, task="dialogue", max_steps=40, log_every=5, eval_every=20,
                    lr=1e-2, sample_tokens=8, sample_prompts=["你好"])
    result = train(load_config(None, base=base), quiet=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[-1] < 0.6 * losses[0]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] and 0 <= evals[-1]["accuracy"] <= 1
    samples = [e for e in events if e["event"] == "samples"]
    assert samples and samples[0]["samples"][0]["prompt"].startswith("你好")
