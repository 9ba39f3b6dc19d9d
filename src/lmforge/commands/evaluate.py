"""`lmforge eval`: the metrics of a checkpoint of any task on one split of a prepared data folder,
or (`--text`) the perplexity and bits per byte of a causal LM on raw text files.

For a classifier: accuracy, per-class precision / recall / F1 and the confusion matrix; for the
other tasks what the task's own evaluation reports (lm: loss, perplexity, token accuracy). The
checkpoint is evaluated with the dataset options of its run config, pointed at `data_dir`.
Raw text is scored with a sliding window (`lmforge.inference.perplexity`), one row per file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from lmforge.base.config import Config, DataConfig, TrainConfig, config_from_dict
from lmforge.base.metrics import format_classification
from lmforge.base.runtime import setup_runtime
from lmforge.checkpoint import load_checkpoint, load_model, resolve_checkpoint
from lmforge.data.store import read_meta
from lmforge.inference.checks import check_count, inference_device
from lmforge.models.heads import label_names_of
from lmforge.train.evaluate import evaluate
from lmforge.train.task_classify import evaluate_split
from lmforge.train.tasks import make_task


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, split: str = "test",
                        batch_size: int = 32, device: str = "auto") -> dict:
    """Metrics of a checkpoint (or run folder) on `split` of the prepared folder `data_dir`."""
    check_count(batch_size, "--batch-size")
    inference_device(device)  # a bad --device is refused before the checkpoint is read
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
    model, _ = load_model(path, overrides={"dropout": 0.0} if "dropout" in arch else None, checkpoint=ckpt)
    cfg = _eval_config(ckpt.run_config, path, data_dir, meta)
    # seeded after the model is built (building draws random numbers): evaluation's draws follow the seed
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


def text_eval_command(out: TextIO, checkpoint: str | Path, texts: list[Path], *, stride: int | None = None,
                      batch_size: int = 8, device: str = "auto", as_json: bool = False,
                      text_field: str = "text", text_column: str | int = "text") -> dict:
    """`lmforge eval --text`: perplexity and bits per byte per file and in total (a table, or one
    JSON object with `as_json`)."""
    from lmforge.inference.loaded import load_for_inference
    from lmforge.inference.perplexity import check_causal, perplexity_report
    check_count(batch_size, "--batch-size")
    loaded = load_for_inference(checkpoint, device)
    check_causal(loaded)
    result = perplexity_report(loaded, texts, stride=stride, batch_size=batch_size, text_field=text_field,
                               text_column=text_column)
    if as_json:
        out.write(json.dumps(result) + "\n")
        return result
    context, stride = result["context"], result["stride"]
    how = (f"every token but the first scored once, with at least {context - stride} tokens before it where the "
           "text has them" if stride < context else "disjoint windows, the first token of each not scored")
    out.write(f"{loaded.path}: context {context}, stride {stride} ({how})\n")
    rows = [(r["text"], f"{r['tokens']:,}", f"{r['scored']:,}", f"{r['mean_nll']:.4f}", f"{r['perplexity']:.3f}",
             f"{r['bits_per_byte']:.4f}")
            for r in result["texts"] + ([{**result, "text": "total"}] if len(result["texts"]) > 1 else [])]
    header = ("text", "tokens", "scored", "nll/token", "perplexity", "bits/byte")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + "\n")
    return result
