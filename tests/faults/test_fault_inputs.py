"""Nothing executed on bad input: every broken corpus, config or tokenizer gets an error that
names the file, the line and the fix, before any training step, and leaves no data folder."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faultkit as fk
from faultkit import data_fixture  # noqa: F401  (fixtures)
from lmforge.cli import main
from lmforge.train import task_lm


@pytest.fixture(scope="module")
def tokenizer(data: Path) -> Path:
    return data / "tokenizer.json"


def _prepare_fails(tmp_path: Path, tokenizer: Path, name: str, content: bytes, *expected: str,
                   extra: tuple[str, ...] = ()) -> str:
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "out" / "data"
    code, message = fk.run_cli(["prepare", "--input", str(source), "--tokenizer", str(tokenizer), "--out", str(out),
                               *extra])
    assert code == 2, message
    assert "Traceback" not in message and "\nerror: " in "\n" + message
    for text in (str(source), *expected):
        assert text in message, (text, message)
    assert not out.exists() and list(out.parent.glob("*")) == []  # no half-written folder, no temp
    return message


CORPORA = {
    "empty": ("empty.txt", b"", ["corpus is empty"]),
    "whitespace_only": ("blank.txt", b"  \n\n\t \r\n\n", ["corpus is empty"]),
    "latin1": ("latin1.txt", "first line\nna\u00efve caf\u00e9\n".encode("latin-1"), ["line 2", "not valid UTF-8", "iconv"]),
    "invalid_bytes": ("bad.txt", b"ok\n\nstill ok\nthen \xff\xfe\xfd junk\n", ["line 4", "not valid UTF-8"]),
    "utf16_bom": ("utf16.txt", "hello\nworld\n".encode("utf-16"), ["UTF-16", "iconv -f utf-16"]),
    "nul_bytes": ("nul.txt", b"text\n\nmore text\x00\x00 here\n", ["line 3", "NUL byte"]),
    "broken_jsonl": ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n', ["line 2", "not valid JSON"]),
    "jsonl_missing_field": ("field.jsonl", b'{"text": "a"}\n{"body": "b"}\n', ["line 2", "no field 'text'"]),
    "csv_unclosed_quote": ("quote.csv", b'text,id\n"fine",1\n"never closed,2\nnext,3\n', ["line 3", "malformed CSV"]),
    "csv_stray_quote": ("stray.csv", b'text,id\nfine,1\n"a"b,2\n', ["line 3", "malformed CSV"]),
    "csv_missing_column": ("cols.csv", b"body,id\nhello,1\n", ["line 1", "no column 'text'"]),
    # .gz is read directly: a cut-short stream and bad bytes inside one are errors, not tracebacks
    "truncated_gzip": ("cut.txt.gz", gzip.compress(b"some text\n" * 5000)[:60], ["damaged or truncated gzip"]),
    "latin1_in_gzip": ("latin1.jsonl.gz", gzip.compress('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1")),
                       ["line 2", "not valid UTF-8"]),
    "bzip2": ("corpus.txt.bz2", b"BZh91AY&SY", ["not read directly", "decompress it first"]),
}


@pytest.mark.parametrize("case", list(CORPORA))
def test_a_bad_corpus_is_an_error_naming_file_line_and_fix(case: str, tokenizer: Path, tmp_path: Path):
    name, content, expected = CORPORA[case]
    _prepare_fails(tmp_path, tokenizer, name, content, *expected)


def test_classify_label_outside_the_label_set(tokenizer: Path, tmp_path: Path):
    content = b"text,label\nwin a prize,spam\nhello mum,ham\nfree eggs,eggs\n"
    _prepare_fails(tmp_path, tokenizer, "labels.csv", content, "line 4", "'eggs'", "ham,spam",
                   extra=("--task", "classify", "--labels", "ham,spam"))


def test_dialogue_unknown_role_is_an_error_and_empty_turns_are_counted(tokenizer: Path, tmp_path: Path):
    bad = (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "boo"}]})
           + "\n").encode()
    _prepare_fails(tmp_path, tokenizer, "roles.jsonl", bad, "line 1", "unknown role 'wizard'",
                   extra=("--task", "dialogue"))
    lines = [{"turns": ["hi there", "hello"]}, {"turns": ["", " "]}, {"turns": ["how are you", "fine"]},
             {"turns": ["bye", "see you"]}]
    source = tmp_path / "empty_turns.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in lines))
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["prepare", "--task", "dialogue", "--input", str(source), "--tokenizer", str(tokenizer),
                     "--out", str(tmp_path / "dialogues")])
    assert code == 0, err.getvalue()
    meta = json.loads((tmp_path / "dialogues" / "meta.json").read_text())
    assert sum(split["samples"] for split in meta["splits"].values()) == 3  # the empty one skipped...
    assert "skipped" in (out.getvalue() + err.getvalue()) + json.dumps(meta)  # ...and said so


def test_a_50mb_line_without_newline_keeps_memory_bounded(tmp_path: Path):
    """One 50 MB line: read in pieces, tokenized in bounded batches; peak RSS of the child."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(30)) for _ in range(8)]
    (tmp_path / "words.txt").write_text(" ".join(words * 50) + "\n")
    from lmforge.base.tokenizer import train_tokenizer

    tok = train_tokenizer([tmp_path / "words.txt"], kind="bpe", vocab_size=800, out_dir=tmp_path / "tok",
                          show_progress=False)
    line = (" ".join(rng.choice(words) for _ in range(1000)) + " ").encode()
    with open(tmp_path / "line.txt", "wb") as f:
        for _ in range(50_000_000 // len(line) + 1):
            f.write(line)
    # Measured in a middle process, so RUSAGE_CHILDREN sees only the prepare process.
    probe = ("import resource, subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-m', 'lmforge', 'prepare', '--input', 'line.txt', '--tokenizer',"
             f" {str(tok)!r}, '--out', 'data'], capture_output=True, text=True)\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
             "print(r.stderr[-2000:], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    code, peak_mb = map(int, result.stdout.split())
    assert code == 0, result.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["documents"] == 1 and meta["splits"]["train"]["tokens"] > 1_000_000
    print(f"50 MB line: peak RSS {peak_mb} MB")
    assert peak_mb < 320, f"peak RSS {peak_mb} MB for a 50 MB line"


def test_disk_full_while_preparing_leaves_no_data_folder(data: Path, tmp_path: Path):
    """RLIMIT_FSIZE stands in for a full disk: a readable message, exit 1, nothing left behind."""
    import resource

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((data.parent / "corpus.txt").read_text() * 20)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, resource.RLIM_INFINITY))

    result = subprocess.run([sys.executable, "-m", "lmforge", "prepare", "--input", str(corpus), "--tokenizer",
                             str(data / "tokenizer.json"), "--out", str(tmp_path / "out" / "data")],
                            capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "error: disk full" in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "out").glob("*")) == []  # the temp folder is gone, no data folder


def test_a_tokenizer_that_does_not_match_the_model_is_refused(data: Path, tmp_path: Path):
    """Data prepared with another tokenizer (same vocabulary size): fine-tuning and resuming stop."""
    from lmforge.data.prepare import prepare
    from lmforge.base.tokenizer import train_tokenizer

    corpus = tmp_path / "other.txt"
    corpus.write_text((data.parent / "corpus.txt").read_text()[::-1])
    other_tok = train_tokenizer([corpus], kind="bpe", vocab_size=384, out_dir=tmp_path / "tok", show_progress=False)
    prepare("lm", [corpus], other_tok, tmp_path / "other_data", val_fraction=0.1, show_progress=False)
    baseline = fk.baseline(_Factory(tmp_path))
    cfg = fk.run_config(tmp_path / "other_data", tmp_path, "finetune")
    code, message = fk.run_cli(["train", str(cfg), f"model.init_from={baseline / 'checkpoints' / 'last'}", "--quiet"])
    assert code == 2 and "model.init_from" in message and "prepare the data again" in message, message
    assert not (tmp_path / "finetune").exists()
    run = fk.copy_run(baseline, tmp_path / "run")
    code, message = fk.run_cli(["train", "--resume", str(run), f"data.path={tmp_path / 'other_data'}", "--quiet"])
    assert code == 2 and "--resume" in message and str(tmp_path / "other_data") in message, message
    assert "data.path:" in message  # the changed config was printed first


class _Factory:
    """baseline() only needs a factory when nothing is cached yet (never, after the other files)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


def test_config_typos_and_bad_values_are_reported_at_once(data: Path, tmp_path: Path):
    cfg = fk.run_config(data, tmp_path, "typos")
    code, message = fk.run_cli(["train", str(cfg), "train.lerning_rate=1e-3", "train.max_steps=-5",
                               "train.batch_size=0", "train.epochs=many", "model.n_layers=2", "--quiet"])
    assert code == 2 and "Traceback" not in message
    assert "5 problem(s)" in message, message
    for text in ("train.lerning_rate: unknown key; did you mean 'lr'?", "train.max_steps", "train.batch_size",
                 "train.epochs: expected an integer", "model.n_layers: unknown key; did you mean 'n_layer'?"):
        assert text in message, (text, message)
    assert not (tmp_path / "typos").exists()  # stopped before any work


def test_resuming_with_a_changed_config_prints_the_difference(tmp_path: Path):
    from lmforge.train.run import resolve_resume

    run = fk.copy_run(fk.baseline(_Factory(tmp_path)), tmp_path / "run")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        cfg, _ = resolve_resume(run, None, ["train.lr=0.001", "train.max_steps=20"])
    assert cfg.train.lr == 0.001
    assert "train.lr: 0.003 -> 0.001" in err.getvalue() and "train.max_steps: 12 -> 20" in err.getvalue()


# -- numerics -----------------------------------------------------------------------------------


def test_non_finite_losses_skip_the_update_name_the_step_and_stop(data: Path, tmp_path: Path, monkeypatch):
    """Steps 5 (NaN), 6 (inf), 7 (NaN) with max_non_finite=3: no update, no NaN saved, stop at 7.

    Distributed runs (every rank taking the same decision) are not covered here: this suite runs
    one process."""
    from lmforge.base.config import load_config
    from lmforge.train import loop

    real = task_lm.LMTask.loss_and_metrics
    poison = {5: float("nan"), 6: float("inf"), 7: float("nan")}
    calls = {"n": 0}

    def poisoned(self, model, batch):
        stats = real(self, model, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in poison:
                stats.loss_sum = stats.loss_sum * poison[calls["n"]]
        return stats

    saved: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    real_save = loop.save_checkpoint

    def recording_save(path, **kw):
        saved[(Path(path).name, kw["step"])] = {k: v.clone() for k, v in kw["model_state"].items()}
        return real_save(path, **kw)

    monkeypatch.setattr(task_lm.LMTask, "loss_and_metrics", poisoned)
    monkeypatch.setattr(loop, "save_checkpoint", recording_save)
    cfg = load_config(fk.run_config(data, tmp_path, "nan", save_every=1, max_non_finite=3))
    result = loop.train(cfg, quiet=True)
    assert result.reason == "non_finite" and result.exit_code == 1 and result.steps == 7
    log = (result.run_dir / "train.log").read_text()
    assert "step 5: loss nan" in log and "step 6: loss inf" in log and "(3 in a row)" in log
    for (name, step), state in saved.items():
        assert all(bool(torch.isfinite(t).all()) for t in state.values()), (name, step)
    at_4 = saved[("last", 4)]
    for step in (5, 6):  # the skipped steps applied no update
        assert all(torch.equal(saved[("last", step)][k], at_4[k]) for k in at_4), step
    assert max(step for _, step in saved) == 6  # nothing saved for the step that stopped the run
