"""The commands that use a model (generate, chat, classify, embed, eval, import-hf, export,
quickstart, init) meet user mistakes with one `error: ...` line and exit status 2, never a
traceback; they never delete what they read; and row i of what they write is text i."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.base.locks import hold_folder
from lmforge.base.tokenizer import load_tokenizer, train_tokenizer
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.commands.interop import export_hf
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.heads import classifier_architecture
from lmforge.models.registry import model_from_architecture

CORPUS = "the lake is deep and the fox is quick.\nhello there, how are you?\n" * 30


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A GPT run folder, a BERT checkpoint, a GPT classifier and a BERT with a BPE tokenizer
    (no [CLS]/[SEP]), all one layer wide enough to run in milliseconds."""
    root = tmp_path_factory.mktemp("commands")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    bpe = train_tokenizer([root / "corpus.txt"], kind="bpe", vocab_size=300, out_dir=root / "bpe",
                          show_progress=False)
    wordpiece = train_tokenizer([root / "corpus.txt"], kind="wordpiece", vocab_size=120, out_dir=root / "wp",
                                min_frequency=1, show_progress=False)
    torch.manual_seed(0)
    size = {"context": 32, "n_layer": 1, "n_head": 2, "n_embd": 16}
    gpt = GPTConfig(vocab_size=load_tokenizer(bpe).get_vocab_size(), **size)
    run = root / "runs" / "gpt"
    save_checkpoint(run / "checkpoints" / "best", model_state=GPT(gpt).state_dict(),
                    model_config={"model_type": "gpt", **gpt.to_dict()}, tokenizer_file=bpe)
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "gpt"}}))
    (run / "metrics.jsonl").write_text("")
    bert = BertConfig(vocab_size=load_tokenizer(wordpiece).get_vocab_size(), intermediate_size=24, **size)
    save_checkpoint(root / "bert", model_state=Bert(bert).state_dict(),
                    model_config={"model_type": "bert", **bert.to_dict()}, tokenizer_file=wordpiece)
    bert_bpe = BertConfig(vocab_size=gpt.vocab_size, intermediate_size=24, **size)
    save_checkpoint(root / "bert_bpe", model_state=Bert(bert_bpe).state_dict(),
                    model_config={"model_type": "bert", **bert_bpe.to_dict()}, tokenizer_file=bpe)
    arch = classifier_architecture({"model_type": "gpt", **gpt.to_dict()}, ["ham", "spam"])
    save_checkpoint(root / "clf", model_state=model_from_architecture(arch).state_dict(), model_config=arch,
                    tokenizer_file=bpe)
    return {"root": root, "run": run, "gpt": run / "checkpoints" / "best", "bert": root / "bert",
            "bert_bpe": root / "bert_bpe", "clf": root / "clf"}


def _cli(argv: list[str], stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`lmforge ARGV` in this process: (exit status, stdout, stderr); a traceback fails the test."""
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _refused(argv: list[str], *expected: str, stdin: str | None = None, monkeypatch=None) -> str:
    code, out, err = _cli(argv, stdin, monkeypatch)
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- export / import-hf never delete their source ---------------------------------------------------


@pytest.mark.parametrize("target", ["run", "checkpoint", "parent"])
def test_export_overwrite_never_deletes_its_source(models, tmp_path: Path, target: str):
    runs = tmp_path / "runs"
    run = runs / "cp"
    sibling = runs / "other"
    shutil.copytree(models["run"], run)
    shutil.copytree(models["run"], sibling)
    before, kept = _files(run), _files(sibling)
    out = {"run": run, "checkpoint": run / "checkpoints" / "best", "parent": runs}[target]
    _refused(["export", str(run), "--out", str(out), "--overwrite"], "--out", "input")
    assert _files(run) == before and _files(sibling) == kept


def test_import_hf_overwrite_never_deletes_its_source(models, tmp_path: Path):
    hf = export_hf(models["gpt"], tmp_path / "models" / "hf")
    before = _files(hf)
    for out in (hf, tmp_path / "models", tmp_path):
        _refused(["import-hf", str(hf), "--out", str(out), "--overwrite"], "--out", "input")
    assert _files(hf) == before


def test_export_replaces_only_a_folder_of_its_kind_and_one_writer_at_a_time(models, tmp_path: Path):
    checkpoint = shutil.copytree(models["bert"], tmp_path / "ckpt")
    before = _files(checkpoint)
    _refused(["export", str(models["gpt"]), "--out", str(checkpoint), "--overwrite"], "holds a checkpoint")
    assert _files(checkpoint) == before
    with hold_folder(tmp_path / "hf", "export target"):
        _refused(["export", str(models["gpt"]), "--out", str(tmp_path / "hf")], "in use by")
    assert not (tmp_path / "hf").exists()
    assert _cli(["export", str(models["gpt"]), "--out", str(tmp_path / "hf")])[0] == 0
    assert _cli(["export", str(models["bert"]), "--out", str(tmp_path / "hf"), "--overwrite"])[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "bert"


# -- import-hf checks config.json against the weights' headers ------------------------------------------


def _hf_copy(models, tmp_path: Path, **config) -> Path:
    hf = export_hf(models["gpt"], tmp_path / "hf")
    data = json.loads((hf / "config.json").read_text())
    data.update(config)
    (hf / "config.json").write_text(json.dumps(data))
    return hf


def test_import_hf_impossible_config_is_refused_before_allocating(models, tmp_path: Path):
    hf = _hf_copy(models, tmp_path, n_embd=10**9)
    _refused(["import-hf", str(hf), "--out", str(tmp_path / "out")], str(hf / "config.json"))
    assert not (tmp_path / "out").exists()


def test_import_hf_deep_config_over_shallow_weights_allocates_nothing(models, tmp_path: Path):
    """48 layers of width 512 (600 MB of weights) over 1-layer weights: refused from the headers; the
    peak memory of the child stays that of a process that imported torch."""
    hf = _hf_copy(models, tmp_path, n_layer=48, n_embd=512, n_head=8)
    probe = ("import resource, subprocess, sys\n"
             f"r = subprocess.run([sys.executable, '-m', 'lmforge', 'import-hf', {str(hf)!r}, '--out', "
             f"{str(tmp_path / 'out')!r}], capture_output=True, text=True)\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
             "print(r.stderr[-3000:], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    code, peak_mb = map(int, result.stdout.split())
    assert code == 2 and "Traceback" not in result.stderr, result.stderr
    assert "48 layers" in result.stderr and str(hf / "config.json") in result.stderr, result.stderr
    print(f"48-layer config over 1-layer weights: peak RSS {peak_mb} MB")
    assert peak_mb < 560, f"peak RSS {peak_mb} MB: the 48-layer model was built"


def _truncated(data: bytes) -> bytes:
    return data[: len(data) - 64]


def _header_past_end(data: bytes) -> bytes:
    return struct.pack("<Q", len(data) * 4) + data[8:]


DAMAGED = {"truncated": _truncated, "garbage": lambda data: b"definitely not a safetensors header" * 3,
           "header_length_past_end": _header_past_end, "cut_inside_header": lambda data: data[:100]}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_import_hf_damaged_safetensors_names_the_file(models, tmp_path: Path, damage: str):
    hf = _hf_copy(models, tmp_path)
    weights = hf / "model.safetensors"
    weights.write_bytes(DAMAGED[damage](weights.read_bytes()))
    _refused(["import-hf", str(hf), "--out", str(tmp_path / "out")], str(weights), "damaged")
    assert not (tmp_path / "out").exists()


def test_import_hf_broken_folder_files_name_the_file(models, tmp_path: Path):
    hf = _hf_copy(models, tmp_path)
    good = (hf / "config.json").read_text()
    for text, expected in (("[1, 2]", "expected a JSON object"), ("{broken", "not valid JSON")):
        (hf / "config.json").write_text(text)
        _refused(["import-hf", str(hf), "--out", str(tmp_path / "out")], str(hf / "config.json"), expected)
    (hf / "config.json").write_text(good)
    (hf / "tokenizer.json").write_text("{broken")
    _refused(["import-hf", str(hf), "--out", str(tmp_path / "out")], str(hf / "tokenizer.json"), "not valid JSON")
    (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    _refused(["import-hf", str(hf), "--out", str(tmp_path / "out")], "model-00002-of-00002.safetensors",
             "not found")
    assert not (tmp_path / "out").exists()


# -- row i of the output is text i ------------------------------------------------------------------------


def test_embed_input_keeps_one_row_per_line(models, tmp_path: Path):
    texts = tmp_path / "texts.txt"
    texts.write_text("the lake\n\nhello there\n   \nthe fox\n", encoding="utf-8")
    for name in ("gpt", "bert"):
        out = tmp_path / f"{name}.npy"
        code, _, err = _cli(["embed", str(models[name]), "--input", str(texts), "--out", str(out), "--device", "cpu"])
        assert code == 0, err
        vectors = np.load(out)
        assert vectors.shape[0] == 5 and np.isfinite(vectors).all()
        code, stdout, err = _cli(["embed", str(models[name]), "--input", str(texts), "--device", "cpu"])
        records = json.loads(stdout)
        assert [r["text"] for r in records] == ["the lake", "", "hello there", "   ", "the fox"]
        np.testing.assert_allclose([r["mean"] for r in records], vectors, atol=1e-6)
    assert records[1]["tokens"] == ["[CLS]", "[SEP]"]  # BERT: the empty text is [CLS] [SEP]


def test_embed_input_of_one_line_is_a_list_of_one_row(models, tmp_path: Path):
    source = tmp_path / "one.txt"
    source.write_text("the lake\n", encoding="utf-8")
    code, stdout, err = _cli(["embed", str(models["bert"]), "--input", str(source), "--device", "cpu"])
    assert code == 0, err
    assert [r["text"] for r in json.loads(stdout)] == ["the lake"]


def test_embed_jsonl_blank_line_is_an_error_naming_the_line(models, tmp_path: Path):
    source = tmp_path / "texts.jsonl"
    source.write_text('{"text": "the lake"}\n\n{"text": "the fox"}\n', encoding="utf-8")
    _refused(["embed", str(models["bert"]), "--input", str(source)], str(source), "line 2")


def test_classify_input_keeps_one_row_per_line(models, tmp_path: Path):
    source = tmp_path / "texts.txt"
    source.write_text("the lake\n\nhello there\n", encoding="utf-8")
    code, stdout, err = _cli(["classify", str(models["clf"]), "--input", str(source), "--device", "cpu"])
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert [r["text"] for r in rows] == ["the lake", "", "hello there"]
    table = tmp_path / "texts.csv"
    table.write_text('text,id\nthe lake,1\n"",2\nthe fox,3\n', encoding="utf-8")
    code, stdout, err = _cli(["classify", str(models["clf"]), "--input", str(table), "--device", "cpu"])
    assert code == 0, err
    assert [r["text"] for r in csv.DictReader(io.StringIO(stdout))] == ["the lake", "", "the fox"]


# -- clear errors for user mistakes -----------------------------------------------------------------------


def test_invalid_utf8_in_chat_stdin_is_an_error_naming_the_line(models):
    result = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(models["gpt"]), "--device", "cpu",
                             "--max-reply-tokens", "3", "--seed", "1"],
                            input=b"hello there\nna\xefve caf\xe9\n", capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in err, err
    assert "standard input, line 2" in err and "UTF-8" in err, err
    assert len(result.stdout.decode("utf-8", "replace").splitlines()) == 1  # the first line got its reply


def test_invalid_utf8_in_prompt_and_classify_texts(models, tmp_path: Path):
    bad = "caf\udce9"  # the byte 0xe9 of a Latin-1 argument, as Python's argv holds it
    _refused(["generate", str(models["gpt"]), "--prompt", bad, "--max-new-tokens", "2"], "--prompt", "0xe9")
    _refused(["classify", str(models["clf"]), "fine", bad], "text 2", "UTF-8")
    _refused(["embed", str(models["bert"]), bad], "UTF-8")
    source = tmp_path / "latin1.txt"
    source.write_bytes(b"fine\ncaf\xe9\n")
    _refused(["classify", str(models["clf"]), "--input", str(source)], str(source), "line 2", "UTF-8")


@pytest.mark.parametrize("command", ["generate", "chat", "classify", "embed", "eval"])
def test_unknown_device_names_the_choices(models, command: str, monkeypatch):
    checkpoint = {"classify": models["clf"], "embed": models["bert"]}.get(command, models["gpt"])
    extra = {"classify": ["hello"], "embed": ["hello"], "eval": ["--data", str(models["root"] / "nowhere")]}
    _refused([command, str(checkpoint), *extra.get(command, []), "--device", "foo"], "--device 'foo'",
             "auto, cpu, cuda", stdin="hello\n", monkeypatch=monkeypatch)


def test_embed_on_a_classifier_says_what_embed_takes(models):
    _refused(["embed", str(models["clf"]), "hello"], "classifier", "BERT, GPT or Llama")


def test_embed_bert_without_cls_and_sep_is_a_clear_error(models):
    _refused(["embed", str(models["bert_bpe"]), "hello"], "[CLS]/[SEP]")


def test_generate_num_samples_and_sampling_values_are_checked(models):
    gpt = str(models["gpt"])
    _refused(["generate", gpt, "--num-samples", "0"], "--num-samples 0", ">= 1")
    for flag, value in (("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "-1"),
                        ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"), ("--max-new-tokens", "0"),
                        ("--repetition-penalty", "0"), ("--repetition-penalty", "inf"), ("--seed", str(2**64))):
        _refused(["generate", gpt, flag, value], f"{flag} {value}")
    _refused(["chat", gpt, "--max-reply-tokens", "0"], "--max-reply-tokens 0")


def test_a_huge_max_new_tokens_allocates_only_what_is_generated(models):
    from itertools import islice

    from lmforge.inference.generate import SamplingConfig, stream_generate
    from lmforge.inference.loaded import load_for_inference

    loaded = load_for_inference(models["gpt"], "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # single-token steps of a tiny model: threads only contend on 2 busy cores
    try:
        stream = stream_generate(loaded.model, [1, 2, 3], SamplingConfig(max_new_tokens=10**12, temperature=0))
        assert len(list(islice(stream, 1100))) == 1100  # past the context (32) and the first buffer (1024)
        stream.close()
    finally:
        torch.set_num_threads(threads)


def test_chat_transcript_is_checked_before_the_chat_starts(models, tmp_path: Path, monkeypatch):
    for transcript, expected in ((tmp_path, "is a folder"), (tmp_path / "missing" / "t.txt", "does not exist")):
        code, out, err = _cli(["chat", str(models["gpt"]), "--transcript", str(transcript), "--max-reply-tokens",
                               "2"], stdin="hello\n", monkeypatch=monkeypatch)
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert out == ""  # refused before any reply
    assert not (tmp_path / "missing").exists()


def test_embed_and_classify_outputs_are_checked_before_work(models, tmp_path: Path):
    source = tmp_path / "texts.txt"
    source.write_text("the lake\n", encoding="utf-8")
    _refused(["embed", str(models["bert"]), "--input", str(source), "--out", str(source)], "also an input")
    assert source.read_text(encoding="utf-8") == "the lake\n"
    _refused(["embed", str(models["bert"]), "hi", "--out", str(tmp_path / "no" / "v.json")], "does not exist")
    _refused(["classify", str(models["clf"]), "--input", str(source), "--output", str(tmp_path)], "is a folder")
    _refused(["classify", str(models["clf"]), "hi", "--batch-size", "0"], "--batch-size 0")


def test_init_out_below_a_file_is_a_clear_error(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("x")
    _refused(["init", "lm", "--out", str(tmp_path / "notes.txt" / "lm.yaml")], "is a file, not a folder")
    assert _cli(["init", "lm", "--out", f"{tmp_path / 'new'}/"])[0] == 0
    assert (tmp_path / "new" / "gpt-shakespeare.yaml").is_file()  # "DIR/": a folder, even a new one


def test_quickstart_refuses_a_bad_budget_before_any_work(tmp_path: Path):
    for minutes in ("0", "-1", "nan"):
        _refused(["quickstart", "--minutes", minutes, "--out", str(tmp_path / "qs")], "--minutes")
    assert not (tmp_path / "qs").exists()


def test_quickstart_runs_again_over_its_own_folder(tmp_path: Path, monkeypatch):
    """A second quickstart replaces the first one's tokenizer, data and run (two steps here)."""
    from lmforge.commands import quickstart

    out = tmp_path / "qs"
    (tmp_path / "c.txt").write_text(CORPUS, encoding="utf-8")
    train_tokenizer([tmp_path / "c.txt"], kind="bpe", vocab_size=280, out_dir=out / "tokenizer", show_progress=False)
    (out / "gpt").mkdir()
    (out / "gpt" / "config.yaml").write_text("{}\n")
    (out / "gpt" / "metrics.jsonl").write_text("")
    monkeypatch.setattr(quickstart, "_steps_for_budget", lambda base, seconds: 2)
    monkeypatch.setitem(quickstart.QUICKSTART_TRAIN, "sample_tokens", 4)
    small = tmp_path / "shakespeare.txt"  # a slice of the bundled corpus: tokenizer and store in a moment
    small.write_text(quickstart.bundled_corpus().read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    monkeypatch.setattr(quickstart, "bundled_corpus", lambda: small)
    code, stdout, err = _cli(["quickstart", "--minutes", "0.5", "--out", str(out)])
    assert code == 0, err
    assert "validation loss" in stdout and (out / "gpt" / "checkpoints").is_dir()
    assert load_tokenizer(out / "tokenizer" / "tokenizer.json").get_vocab_size() > 280
