"""The MLM task: BERT pretraining with masked-LM + next-sentence-prediction losses.

Loss of a micro-batch = MLM loss (mean over its masked tokens) + NSP loss (mean over its
pairs), as transformers' `BertForPreTraining`. The loop divides `loss_sum` by the targets of
the whole accumulation window, so targets are sentence pairs and `loss_sum` is
pairs x (MLM mean + NSP mean): the window's loss is the pair-weighted mean of the
micro-batch losses (exactly HF's with equal micro-batches). The logged `mlm_loss` and
`mlm_accuracy` are means over all masked tokens of the logging interval; `accuracy` is the
MLM accuracy. Throughput unit: sentence pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.base.config import Config
from lmforge.data.collate import IGNORE_INDEX
from lmforge.data.mlm import MLMCollator, SentencePairDataset
from lmforge.data.store import TokenStore
from lmforge.train.tasks import StepStats, Task


class MLMTask(Task):
    """Masked-LM + next-sentence prediction on sentence pairs (BERT pretraining)."""

    name = "mlm"
    throughput_unit = "pairs"
    model_types = ("bert",)

    def __init__(self, cfg: Config, meta: dict, context: int):
        self.cfg, self.meta, self.context = cfg, meta, context
        ids = meta["special_ids"]
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.pad_id = ids["pad"] if ids.get("pad") is not None else 0
        self.vocab_size = int(meta["vocab_size"])
        self._collate = MLMCollator(self.pad_id, [self.cls_id, self.sep_id], self.mask_id, self.vocab_size)

    def dataset(self, split: str) -> SentencePairDataset:
        store = TokenStore(Path(self.cfg.data.path), split)
        return SentencePairDataset(store, self.context, self.cls_id, self.sep_id, seed=self.cfg.train.seed,
                                   premask=split != "train", mask_id=self.mask_id, vocab_size=self.vocab_size)

    def start_epoch(self, dataset: SentencePairDataset, epoch: int) -> None:
        dataset.set_epoch(epoch)  # sentence pairs are drawn anew per epoch

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return self._collate(samples)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss_and_metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepStats:
        labels = batch["labels"]  # (B, T), -100 where not masked
        masked = labels != IGNORE_INDEX  # (B, T)
        mlm_logits, nsp_logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                       mlm_positions=masked)  # (N, V), (B, 2)
        targets = labels[masked]  # (N,)
        nsp_targets = batch["next_sentence_label"]  # (B,)
        mlm_sum = F.cross_entropy(mlm_logits.float(), targets, reduction="sum")
        nsp_sum = F.cross_entropy(nsp_logits.float(), nsp_targets, reduction="sum")
        pairs, n_masked = nsp_targets.shape[0], targets.shape[0]
        loss_sum = pairs * mlm_sum / max(1, n_masked) + nsp_sum
        mlm_correct = (mlm_logits.argmax(-1) == targets).sum()
        nsp_correct = (nsp_logits.argmax(-1) == nsp_targets).sum()
        one = torch.ones((), device=labels.device)
        return StepStats(loss_sum=loss_sum, targets=one * pairs, correct=mlm_correct,
                         extras={"mlm_loss_sum": mlm_sum, "mlm_targets": one * n_masked,
                                 "nsp_loss_sum": nsp_sum, "nsp_correct": nsp_correct})

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(1.0, sums.get("targets", 0.0))
        masked = max(1.0, sums.get("mlm_targets", 0.0))
        mlm_accuracy = sums["correct"] / masked
        return {"loss": sums["loss_sum"] / pairs, "accuracy": mlm_accuracy,
                "mlm_loss": sums["mlm_loss_sum"] / masked, "nsp_loss": sums["nsp_loss_sum"] / pairs,
                "mlm_accuracy": mlm_accuracy, "nsp_accuracy": sums["nsp_correct"] / pairs}

    def console_extras(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"mlm": metrics["mlm_loss"], "nsp": metrics["nsp_loss"], "nsp_acc": metrics["nsp_accuracy"]}
