"""The library API: what a Python user calls, in a few names.

    import lmforge
    lmforge.train_tokenizer(["corpus.txt"], "tok/corpus", vocab_size=2048)
    lmforge.prepare("lm", ["corpus.txt"], "tok/corpus", "data/corpus")
    result = lmforge.train_model({"data": {"path": "data/shakespeare"}, "train": {"max_steps": 200}})
    model = lmforge.load(result.run_dir)
    model.generate(["ROMEO:", "JULIET:"], max_new_tokens=40, temperature=0)
    lmforge.load("runs/spam-gpt").classify(["WINNER!! claim your prize"])
    lmforge.load("runs/bert-wikitext").embed(["a crane is flying"]).mean
    lmforge.load("runs/gpt-shakespeare").perplexity("test.txt", stride=128)["perplexity"]
    lmforge.evaluate("runs/spam-gpt", "data/sms_spam", split="test")

Each is a thin layer over the modules that do the work (`lmforge.train.run`,
`lmforge.inference.*`, `lmforge.commands.evaluate`). Nothing here changes the process: no
signal handlers, no allocator settings, no output unless asked (`show_progress`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.base.config import Config
from lmforge.base.tokenizer import train_tokenizer as _train_tokenizer
from lmforge.commands.evaluate import evaluate_checkpoint
from lmforge.data.prepare import prepare as _prepare
from lmforge.data.prepare_classify import prepare_classify
from lmforge.inference.classifier import load_classifier, predict_texts, predict_values
from lmforge.inference.embedder import Embeddings, embed
from lmforge.inference.generate import SamplingConfig
from lmforge.inference.loaded import LoadedModel, load_for_inference
from lmforge.inference.perplexity import perplexity_report
from lmforge.inference.text import generate_texts
from lmforge.models.heads import is_regression, label_names_of
from lmforge.train.loop import TrainResult
from lmforge.train.run import run_training


def train_tokenizer(inputs: Sequence[str | Path], out: str | Path, *, kind: str = "bpe", vocab_size: int = 8000,
                    show_progress: bool = False, **options: Any) -> Path:
    """Train a byte-level BPE (`kind="bpe"`) or WordPiece tokenizer; returns its tokenizer.json.

    `options` are those of `lmforge tokenizer train` (lowercase, min_frequency, text_field, ...).
    """
    return _train_tokenizer([Path(p) for p in inputs], kind=kind, vocab_size=vocab_size, out_dir=Path(out),
                            show_progress=show_progress, **options)


def prepare(task: str, inputs: Sequence[str | Path], tokenizer: str | Path, out: str | Path, *,
            show_progress: bool = False, **options: Any) -> dict:
    """Tokenize `inputs` into the data folder `out` for `task` (lm, mlm, classify, dialogue).

    `options` are those of `lmforge prepare` (val_fraction, doc_split, fmt="sms" for classify, ...);
    returns the folder's meta.json.
    """
    paths = [Path(p) for p in inputs]
    if task == "classify":
        return prepare_classify(paths, Path(tokenizer), Path(out), show_progress=show_progress, **options)
    return _prepare(task, paths, Path(tokenizer), Path(out), show_progress=show_progress, **options)


def train_model(config: Config | dict | str | Path, overrides: Sequence[str] = (), *,
                resume: str | Path | None = None, quiet: bool = False,
                show_progress: bool = True) -> TrainResult:
    """Train from a config (a dict shaped like the YAML files, a Config, or a YAML path).

    `overrides` are `section.key=value` strings, as on the command line; `resume` continues the
    run folder given. The run folder gets its checkpoints, metrics and report.html, also with
    `quiet=True` (no step lines) or `show_progress=False` (nothing printed at all).
    """
    return run_training(config, overrides, resume=resume, quiet=quiet, show_progress=show_progress)


def load(checkpoint: str | Path, device: str = "auto") -> "Model":
    """A checkpoint folder, or a run folder (its best checkpoint, else its last), ready to use."""
    return Model(load_for_inference(checkpoint, device))


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", *,
             batch_size: int = 32, device: str = "auto") -> dict[str, Any]:
    """Metrics of a checkpoint on one split of a prepared data folder (what `lmforge eval` prints)."""
    return evaluate_checkpoint(checkpoint, data, split, batch_size, device)


class Model:
    """A loaded checkpoint: `generate` for a GPT, `classify` for a classifier, `embed` for BERT or GPT."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @property
    def path(self) -> Path:
        return self.loaded.path

    @property
    def module(self) -> torch.nn.Module:
        """The torch module itself, in eval mode."""
        return self.loaded.model

    @property
    def kind(self) -> str:
        """`gpt`, `bert` or `classifier` (config.json's model_type)."""
        return str(self.loaded.architecture.get("model_type"))

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None) -> str | list[str]:
        """The continuation of each prompt (a list for a list, a string for a string).

        `temperature=0` is greedy; with a `seed` the same call gives the same texts.
        """
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed)
        texts = generate_texts(self.loaded, [prompts] if isinstance(prompts, str) else list(prompts), cfg)
        return texts[0] if isinstance(prompts, str) else texts

    def classify(self, texts: str | Sequence[str], *, batch_size: int = 32) -> list[tuple[str, float]] | list[float]:
        """(label, probability of that label) for each text; a regression head's predicted value."""
        if self.kind != "classifier":
            load_classifier(self.path)  # raises the error that names what this checkpoint is
        self.loaded.tokenizer.no_truncation()  # as load_classifier: predict_texts cuts to the context itself
        self.loaded.tokenizer.no_padding()
        texts = [texts] if isinstance(texts, str) else list(texts)
        if is_regression(self.loaded.architecture):
            return predict_values(self.loaded, texts, batch_size)
        return predict_texts(self.loaded, label_names_of(self.loaded.architecture), texts, batch_size)

    def perplexity(self, files: str | Path | Sequence[str | Path], *, stride: int | None = None,
                   batch_size: int = 8) -> dict[str, Any]:
        """Sliding-window perplexity and bits per byte of text files under a GPT or Llama-class
        model (what `lmforge eval --text --json` prints): the total's numbers, "texts" per file."""
        files = [files] if isinstance(files, (str, Path)) else list(files)
        return perplexity_report(self.loaded, files, stride=stride, batch_size=batch_size)

    def embed(self, texts: str | Sequence[str], *, pairs: Sequence[str] | None = None,
              batch_size: int = 32) -> Embeddings:
        """Per-token and sentence vectors (`.mean`, and `.cls` for BERT) of each text (or pair)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return embed(self.loaded, texts, list(pairs) if pairs is not None else None, batch_size)

    def __repr__(self) -> str:
        return f"lmforge.Model({self.kind}, {self.path}, device={self.loaded.device})"
