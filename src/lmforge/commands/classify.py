"""Using a trained classifier, and evaluating any checkpoint on a prepared split.

Owns `lmforge classify` (label + probability for texts, or a CSV for a file of texts) and
`lmforge eval` (the metrics of a checkpoint on one split of a prepared data folder: for a
classifier accuracy, per-class precision / recall / F1 and the confusion matrix; for other
tasks what the task's own `summarize` reports, e.g. loss, perplexity and token accuracy for lm).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TextIO

import torch

from lmforge.base.config import Config, DataConfig, TrainConfig, config_from_dict
from lmforge.base.readers import check_inputs, iter_documents
from lmforge.data.store import read_meta
from lmforge.checkpoint import resolve_checkpoint
from lmforge.inference.loaded import LoadedModel, load_for_inference
from lmforge.base.metrics import format_classification
from lmforge.models.heads import label_names_of
from lmforge.models.registry import load_weights, model_from_architecture
from lmforge.base.runtime import setup_runtime
from lmforge.checkpoint import load_checkpoint
from lmforge.train.tasks import make_task


def load_classifier(checkpoint: str | Path, device: str = "auto") -> tuple[LoadedModel, list[str]]:
    """A classifier checkpoint (or run folder) ready to predict, and its label names."""
    loaded = load_for_inference(checkpoint, device)
    arch = load_checkpoint(loaded.path).model_config
    if arch.get("model_type") != "classifier":
        raise ValueError(f"{loaded.path}: a {arch.get('model_type')!r} checkpoint, not a classifier; "
                         "fine-tune one with train.task=classify")
    loaded.tokenizer.no_truncation()
    loaded.tokenizer.no_padding()
    return loaded, label_names_of(arch)


@torch.inference_mode()
def predict_texts(loaded: LoadedModel, label_names: list[str], texts: list[str],
                  batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability of that label) for every text, encoded as `prepare --task classify` does."""
    specials, context = loaded.specials, loaded.model.config.context
    wrap = specials.cls is not None and specials.sep is not None
    pad = specials.pad if specials.pad is not None else 0
    results: list[tuple[str, float]] = []
    for start in range(0, len(texts), batch_size):
        encoded = loaded.tokenizer.encode_batch(texts[start:start + batch_size], add_special_tokens=False)
        rows = []
        for enc in encoded:
            ids = [specials.cls, *enc.ids[:context - 2], specials.sep] if wrap else \
                (enc.ids[:context] or [specials.eos if specials.eos is not None else pad])
            rows.append(ids)
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
        logits = loaded.model(input_ids.to(loaded.device), attention_mask=mask.to(loaded.device))  # (B, L)
        probs, best = logits.float().softmax(dim=-1).max(dim=-1)  # (B,), (B,)
        results += [(label_names[k], float(p)) for k, p in zip(best.tolist(), probs.tolist())]
    return results


def read_texts(path: Path, text_column: str | int = "text") -> list[str]:
    """Texts to classify: one per line (.txt), or a column (.csv/.tsv) or field (.jsonl)."""
    (path,) = check_inputs([path])
    return [doc.text for doc in iter_documents(path, text_field=str(text_column), text_column=text_column,
                                               doc_split="line")]


def classify_command(out: TextIO, checkpoint: str | Path, texts: list[str], *, input_file: Path | None = None,
                     output: Path | None = None, text_column: str | int = "text", batch_size: int = 32,
                     device: str = "auto") -> list[tuple[str, float]]:
    """`lmforge classify`: print `label<TAB>probability` per text; with `input_file`, write a CSV of
    text, label, probability to `output` (or to `out` when no output is given)."""
    if input_file is not None:
        texts = [*texts, *read_texts(input_file, text_column)]
    if not texts:
        raise ValueError("nothing to classify: give a text or --input FILE")
    loaded, labels = load_classifier(checkpoint, device)
    results = predict_texts(loaded, labels, texts, batch_size)
    if input_file is None:
        for label, prob in results:
            out.write(f"{label}\t{prob:.4f}\n")
        return results
    handle = open(output, "w", encoding="utf-8", newline="") if output is not None else out
    try:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "probability"])
        writer.writerows((text, label, f"{prob:.6f}") for text, (label, prob) in zip(texts, results))
    finally:
        if output is not None:
            handle.close()
            print(f"wrote {len(results)} predictions to {output}", file=sys.stderr)
    return results


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, split: str = "test",
                        batch_size: int = 32, device: str = "auto") -> dict:
    """Metrics of a checkpoint (or run folder) on `split` of the prepared folder `data_dir`."""
    from lmforge.train.evaluate import evaluate
    from lmforge.train.task_classify import evaluate_split

    path = resolve_checkpoint(Path(checkpoint))
    ckpt = load_checkpoint(path)
    meta = read_meta(Path(data_dir))
    arch = ckpt.model_config
    if arch.get("vocab_size") != meta.get("vocab_size"):
        raise ValueError(f"{path}: the model has a vocabulary of {arch.get('vocab_size')} tokens but "
                         f"{data_dir} was prepared with {meta.get('vocab_size')}; prepare it with the "
                         "checkpoint's tokenizer.json")
    if not (Path(data_dir) / f"{split}.bin").exists():
        raise FileNotFoundError(f"{data_dir}: no split {split!r} (prepare with --test-fraction for a test split)")
    if (arch.get("model_type") == "classifier") != (meta.get("task") == "classify"):
        raise ValueError(f"{path}: a {arch.get('model_type')!r} checkpoint cannot be evaluated on {data_dir}, "
                         f"prepared for task {meta.get('task')!r}")
    model = model_from_architecture({**arch, "dropout": 0.0} if "dropout" in arch else arch)
    load_weights(model, ckpt.state_dict, path)
    cfg = _eval_config(ckpt.run_config, path, data_dir, meta)
    rt = setup_runtime(device, "fp32", cfg.train.seed)
    model.to(rt.device).eval()
    task = make_task(cfg, meta, model.config.context)
    dataset = task.dataset(split)
    if arch.get("model_type") == "classifier":
        if label_names_of(arch) != list(meta.get("label_names") or []):
            raise ValueError(f"{path}: a classifier for labels {label_names_of(arch)}, but {data_dir} "
                             f"has labels {meta.get('label_names')}")
        metrics = evaluate_split(model, task, dataset, batch_size, rt)
    else:
        metrics = evaluate(model, task, dataset, batch_size, None, rt)
    if not metrics:
        raise ValueError(f"{data_dir}: split {split!r} has no samples to evaluate")
    return {"task": task.name, "split": split, "checkpoint": str(path), **metrics}


def _eval_config(run_config: dict | None, path: Path, data_dir: str | Path, meta: dict) -> Config:
    """The checkpoint's run config pointed at `data_dir` (the task's dataset options stay as trained)."""
    if run_config is not None:
        cfg = config_from_dict(run_config, f"{path}/run_config.json")
    else:
        cfg = Config(data=DataConfig(path=str(data_dir)), train=TrainConfig(task=meta.get("task", "lm")))
    cfg.data.path = str(data_dir)
    return cfg


def eval_command(out: TextIO, checkpoint: str | Path, data_dir: str | Path, split: str = "test",
                 batch_size: int = 32, device: str = "auto") -> dict:
    """`lmforge eval`: print the metrics table (and the confusion matrix for a classifier)."""
    metrics = evaluate_checkpoint(checkpoint, data_dir, split, batch_size, device)
    out.write(f"{metrics['checkpoint']} on {data_dir} ({metrics['task']})\n")
    if "confusion" in metrics:
        out.write(format_classification(metrics, split) + "\n")
    else:
        parts = [f"{key} {value:.4f}" for key, value in metrics.items()
                 if isinstance(value, float) and key not in ("task", "split", "checkpoint")]
        out.write(f"{split}: " + " | ".join(parts) + "\n")
    return metrics
