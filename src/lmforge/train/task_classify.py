"""The classify task: fine-tune a GPT or BERT backbone with a linear head on labelled texts.

Owns the labelled-text Dataset, the cross-entropy loss and accuracy per batch, turning the loop's
model into a `SequenceClassifier` (`train.trainable` is applied by the set-up, for every task), and the end-of-training
report: full train / val / test accuracy, per-class precision, recall and F1 and the confusion
matrix, computed with the best checkpoint's weights (`final` events in metrics.jsonl).

Of the optional hooks of `lmforge.train.tasks.Task` it uses `prepare_model`, `eval_train`,
`best_metric` (val accuracy) and `final_report`. `evaluate_split` (also `lmforge eval`'s for a
classifier) runs the one evaluation loop of `lmforge.train.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lmforge.base.config import Config
from lmforge.data.collate import pad_collate
from lmforge.data.store import TokenStore
from lmforge.base.metrics import classification_metrics, confusion_matrix, format_classification
from lmforge.checkpoint import load_model, read_manifest
from lmforge.models.heads import SequenceClassifier, classifier_architecture
from lmforge.train.evaluate import evaluation_sums
from lmforge.train.tasks import StepStats, Task


class ClassifyDataset(Dataset):
    """Item i = {"input_ids": LongTensor(n), "label": LongTensor()} (a float32 target for a
    regression folder), cut to `context` tokens.

    A `[CLS] ... [SEP]` sample (wrap "cls_sep") that is too long keeps its final [SEP].
    """

    def __init__(self, store: TokenStore, context: int, wrap: str = "none", sep_id: int | None = None):
        if store.labels is None:
            raise ValueError(f"{store.data_dir}: split {store.split!r} has no labels; prepare the data "
                             "with `lmforge prepare --task classify`")
        self.store, self.context, self.wrap, self.sep_id = store, context, wrap, sep_id

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = np.asarray(self.store[i], dtype=np.int64)
        if len(ids) > self.context:
            ids = np.append(ids[:self.context - 1], self.sep_id) if self.wrap == "cls_sep" \
                else ids[:self.context]
        label = self.store.labels[i]
        target = torch.tensor(float(label), dtype=torch.float32) if self.store.labels.dtype.kind == "f" \
            else torch.tensor(int(label))
        return {"input_ids": torch.from_numpy(ids), "label": target}


class ClassifyTask(Task):
    """Sequence classification: one label per text, loss = mean cross-entropy over texts."""

    name = "classify"
    throughput_unit = "ex"
    best_metric = "val_accuracy"
    eval_train = True
    model_types = ("gpt", "llama", "bert", "classifier")

    def __init__(self, cfg: Config, meta: dict, context: int):
        self.cfg = cfg
        self.meta = meta
        self.context = context
        self.label_names = list(meta.get("label_names") or [])
        if len(self.label_names) < 2:
            raise ValueError(f"{cfg.data.path}/meta.json: no label_names; prepare the data again "
                             "with `lmforge prepare --task classify`")
        wanted = cfg.model.num_labels
        if wanted == 1:
            raise ValueError(f"model.num_labels=1 is a regression head, but {cfg.data.path} holds class labels "
                             f"{self.label_names}; prepare numeric targets with `lmforge prepare --task classify "
                             "--regression`, or leave model.num_labels unset")
        if wanted is not None and wanted != len(self.label_names):
            raise ValueError(f"model.num_labels={wanted}, but {cfg.data.path} has {len(self.label_names)} labels "
                             f"{self.label_names}; leave model.num_labels unset to take the data's")
        self.pad_id = int(meta["special_ids"].get("pad") or 0)
        self.wrap = meta.get("special_wrap", "none")
        self.sep_id = meta["special_ids"].get("sep")

    def dataset(self, split: str) -> ClassifyDataset:
        return ClassifyDataset(TokenStore(Path(self.cfg.data.path), split), self.context, self.wrap, self.sep_id)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_collate(samples, self.pad_id)
        del batch["labels"]  # token labels: not used, the target is "label" (B,)
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["label"].numel()

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss_and_metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepStats:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, L)
        target = batch["label"]  # (B,)
        loss_sum = F.cross_entropy(logits.float(), target, reduction="sum")
        correct = (logits.detach().argmax(dim=-1) == target).sum()
        return StepStats(loss_sum=loss_sum, targets=torch.tensor(target.numel(), device=target.device),
                         correct=correct)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss per text and accuracy."""
        n = max(1.0, sums.get("targets", 0.0))
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

    # -- optional hooks -------------------------------------------------------------------------

    def prepare_model(self, model: nn.Module, arch: dict) -> tuple[nn.Module, dict]:
        """A backbone (from scratch or model.init_from) gets a fresh head; a classifier is checked."""
        if arch.get("model_type") == "classifier":
            if list(arch.get("label_names") or []) != self.label_names:
                raise ValueError(f"model.init_from {self.cfg.model.init_from}: a classifier for labels "
                                 f"{arch.get('label_names')}, but the data in {self.cfg.data.path} has "
                                 f"{self.label_names}; start from its backbone instead")
        else:
            arch = classifier_architecture(arch, self.label_names, dropout=self.cfg.model.dropout)
            model = SequenceClassifier(model, len(self.label_names), arch["pooling"], self.cfg.model.dropout)
        return model, arch

    def final_report(self, model: nn.Module, rt, log, position: dict) -> dict[str, dict]:
        """Full-split metrics of the best checkpoint (else the final weights), logged as `final` events."""
        return final_splits_report(self, model, rt, log, position, format_classification)

    def full_metrics(self, model: nn.Module, dataset, batch_size: int, rt) -> dict | None:
        """The metrics of all of `dataset` (`evaluate_split`)."""
        return _classification_split(model, self, dataset, batch_size, rt)


def final_splits_report(task, model: nn.Module, rt, log, position: dict,
                        format_split: Callable[[dict, str], str]) -> dict[str, dict]:
    """`task.full_metrics` of train, val and test under the best checkpoint (else the final weights),
    logged as `final` events and as `format_split`'s lines."""
    cfg = task.cfg
    best = cfg.run_dir / "checkpoints" / "best"
    which = "final weights"
    if (best / "manifest.json").exists():
        model, _ = load_model(best, device=rt.device)
        which = f"best checkpoint (step {read_manifest(best).get('step')})"
    log.line(f"final metrics of the {which}:")
    results = {}
    for split in dict.fromkeys(["train", cfg.data.val_split, "test"]):
        if not (Path(cfg.data.path) / f"{split}.bin").exists():
            continue
        metrics = task.full_metrics(model, task.dataset(split), cfg.train.batch_size, rt)
        if metrics is None:
            continue
        results[split] = metrics
        log.event("final", split=split, **position, **metrics)
        log.line(format_split(metrics, split))
    return results


def evaluate_split(model: nn.Module, task, dataset, batch_size: int, rt) -> dict | None:
    """All of `dataset` under a classify task: loss, accuracy, per-class precision/recall/F1 and the
    confusion matrix; for a regression folder's task (`task_regress`) MSE, MAE, RMSE and Pearson r."""
    return task.full_metrics(model, dataset, batch_size, rt)


def _classification_split(model: nn.Module, task: ClassifyTask, dataset, batch_size: int, rt) -> dict | None:
    if len(dataset) == 0:
        return None
    num_labels = len(task.label_names)

    def measure(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # (B, L)
        target = batch["label"]  # (B,)
        return {"loss_sum": F.cross_entropy(logits, target, reduction="sum").double(),
                "samples": torch.tensor(target.numel(), device=target.device),
                "confusion": confusion_matrix(target, logits.argmax(dim=-1), num_labels)}  # (L, L)

    sums = evaluation_sums(model, task, dataset, batch_size, rt, measure)
    samples = int(sums["samples"])
    return {"loss": float(sums["loss_sum"]) / samples, "samples": samples,
            **classification_metrics(sums["confusion"].cpu(), task.label_names)}
