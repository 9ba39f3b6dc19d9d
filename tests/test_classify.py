"""`lmforge classify` and `lmforge eval`: predictions as the model computes them, metric tables."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.commands.classify import classify_command
from lmforge.commands.evaluate import eval_command, evaluate_checkpoint
from lmforge.data.prepare_classify import prepare_classify
from lmforge.models.heads import classifier_architecture
from lmforge.models.registry import model_from_architecture
from lmforge.base.tokenizer import load_tokenizer, train_tokenizer
from lmforge.checkpoint import save_checkpoint

TEXTS = ["WINNER claim your free prize now", "see you at the bus stop", "ok lar"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    sms = root / "sms.tsv"
    sms.write_text("".join(f"{'spam' if i % 4 == 0 else 'ham'}\t{TEXTS[i % 3]} {i}\n" for i in range(60)))
    tok = train_tokenizer([sms], kind="bpe", vocab_size=300, out_dir=root / "tok", text_column=1,
                          show_progress=False)
    prepare_classify([sms], tok, root / "data", fmt="sms", show_progress=False)
    torch.manual_seed(0)
    backbone = {"model_type": "gpt", "vocab_size": 300, "context": 32, "n_layer": 1, "n_head": 2,
                "n_embd": 16, "dropout": 0.0}
    arch = classifier_architecture(backbone, ["ham", "spam"])
    model = model_from_architecture(arch).eval()
    ckpt = save_checkpoint(root / "ckpt", model_state=model.state_dict(), model_config=arch, tokenizer_file=tok)
    return root, ckpt, model, load_tokenizer(tok)


def test_classify_prints_the_label_and_probability_the_model_gives(setup):
    _, ckpt, model, tok = setup
    out = io.StringIO()
    results = classify_command(out, ckpt, TEXTS, device="cpu")
    with torch.no_grad():
        for text, (label, prob) in zip(TEXTS, results):
            probs = model(torch.tensor([tok.encode(text).ids])).softmax(-1)[0]
            assert label == ["ham", "spam"][int(probs.argmax())]
            assert prob == pytest.approx(float(probs.max()), abs=1e-5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0] == f"{results[0][0]}\t{results[0][1]:.4f}"


def test_classify_input_file_writes_a_csv(setup, tmp_path, capsys):
    _, ckpt, _, _ = setup
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n\n")
    assert main(["classify", str(ckpt), "--input", str(src), "--output", str(tmp_path / "o.csv"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    # row i is line i: the blank last line is an empty text, classified too
    assert [r["text"] for r in rows] == [*TEXTS, ""] and {r["label"] for r in rows} <= {"ham", "spam"}
    assert all(0.5 <= float(r["probability"]) <= 1.0 for r in rows)


def test_eval_prints_the_table_and_matches_a_direct_count(setup, capsys):
    root, ckpt, model, _ = setup
    metrics = eval_command(io.StringIO(), ckpt, root / "data", "test", device="cpu")
    assert metrics["task"] == "classify" and metrics["samples"] == 12
    assert sum(map(sum, metrics["confusion"])) == 12
    assert metrics["accuracy"] == pytest.approx(sum(metrics["confusion"][i][i] for i in range(2)) / 12)
    assert main(["eval", str(ckpt), "--data", str(root / "data"), "--split", "val", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "val: accuracy" in text and "confusion matrix" in text and "precision" in text


def test_eval_of_an_lm_checkpoint_reports_loss_perplexity_and_token_accuracy(lm_data, tmp_path):
    torch.manual_seed(0)
    arch = {"model_type": "gpt", "vocab_size": json.loads((lm_data / "meta.json").read_text())["vocab_size"],
            "context": 32, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}
    model = model_from_architecture(arch)
    ckpt = save_checkpoint(tmp_path / "lm", model_state=model.state_dict(), model_config=arch,
                           tokenizer_file=lm_data / "tokenizer.json")
    metrics = evaluate_checkpoint(ckpt, lm_data, "val", device="cpu")
    assert metrics["task"] == "lm" and set(metrics) >= {"loss", "perplexity", "accuracy"}
    assert metrics["loss"] == pytest.approx(math.log(arch["vocab_size"]), rel=0.05)  # untrained: uniform
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_mismatches_are_clear_errors(setup, lm_data):
    root, ckpt, _, _ = setup
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        evaluate_checkpoint(ckpt, lm_data, "val", device="cpu")
    with pytest.raises(FileNotFoundError, match="no split 'dev'"):
        evaluate_checkpoint(ckpt, root / "data", "dev", device="cpu")
    with pytest.raises(ValueError, match="nothing to classify"):
        classify_command(io.StringIO(), ckpt, [], device="cpu")
