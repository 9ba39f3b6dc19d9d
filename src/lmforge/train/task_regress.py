"""The classify task on a regression folder (`prepare --task classify --regression`): one number
per text, learned by a one-output head with the mean squared error.

Owns the MSE loss (float32 targets), the sums of MAE, RMSE and Pearson r per batch
(`lmforge.base.metrics.regression_sums`), the regression head on the loop's model, and the
end-of-training report: full train / val / test MSE, MAE, RMSE and Pearson r of the best
checkpoint (`final` events in metrics.jsonl). The best checkpoint is the lowest validation RMSE.
`lmforge.train.tasks.task_for_data` picks this class for `train.task=classify` when meta.json
says `problem_type: "regression"`; `model.num_labels` must then be 1 or unset.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from lmforge.base.config import Config
from lmforge.base.metrics import format_regression, regression_metrics, regression_sums
from lmforge.models.heads import SequenceClassifier, classifier_architecture, is_regression
from lmforge.train.evaluate import evaluation_sums
from lmforge.train.task_classify import ClassifyTask, final_splits_report
from lmforge.train.tasks import StepStats, Task

_SHOWN = ("mae", "rmse", "pearson")


class RegressTask(Task):
    """Text regression: one target per text, loss = mean squared error over texts."""

    name = "classify"
    throughput_unit = "ex"
    best_metric = "val_rmse"
    model_types = ("gpt", "llama", "bert", "classifier")

    def __init__(self, cfg: Config, meta: dict, context: int):
        if meta.get("problem_type") != "regression":
            raise ValueError(f"{cfg.data.path}/meta.json: not a regression folder; prepare it with "
                             "`lmforge prepare --task classify --regression`")
        if cfg.model.num_labels not in (None, 1):
            raise ValueError(f"model.num_labels={cfg.model.num_labels}, but {cfg.data.path} holds numeric targets "
                             f"(column {meta.get('target_column', 'label')!r}, prepared with --regression): a "
                             "regression head has 1 output; set model.num_labels=1 or leave it unset")
        self.cfg, self.meta, self.context = cfg, meta, context
        self.pad_id = int(meta["special_ids"].get("pad") or 0)
        self.wrap = meta.get("special_wrap", "none")
        self.sep_id = meta["special_ids"].get("sep")

    # the samples are classify's: the same texts, a float32 target in place of the label id
    dataset = ClassifyTask.dataset
    collate = ClassifyTask.collate
    count_targets = ClassifyTask.count_targets
    count_tokens = ClassifyTask.count_tokens

    def loss_and_metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepStats:
        predicted = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0].float()  # (B,)
        target = batch["label"].float()  # (B,)
        loss_sum = F.mse_loss(predicted, target, reduction="sum")
        extras = regression_sums(predicted, target)
        del extras["samples"]  # the loop's "targets" counts them
        return StepStats(loss_sum=loss_sum, targets=torch.tensor(target.numel(), device=target.device),
                         correct=torch.zeros((), dtype=torch.long, device=target.device), extras=extras)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean squared error per text (the loss), MAE, RMSE and Pearson r."""
        metrics = regression_metrics({**sums, "samples": sums.get("targets", 0.0)})
        return {"loss": sums["loss_sum"] / max(1.0, sums.get("targets", 0.0)),
                **{key: metrics[key] for key in _SHOWN}}

    # -- optional hooks -------------------------------------------------------------------------

    def console_extras(self, metrics: dict[str, float]) -> dict[str, float]:
        return {key: metrics[key] for key in _SHOWN if key in metrics}

    def prepare_model(self, model: nn.Module, arch: dict) -> tuple[nn.Module, dict]:
        """A backbone gets a fresh one-output head; a classifier must be a regression head."""
        if arch.get("model_type") == "classifier":
            if not is_regression(arch):
                raise ValueError(f"model.init_from {self.cfg.model.init_from}: a classifier for labels "
                                 f"{arch.get('label_names')}, but the data in {self.cfg.data.path} holds numeric "
                                 "targets (regression); start from its backbone instead")
        else:
            arch = classifier_architecture(arch, None, dropout=self.cfg.model.dropout)
            model = SequenceClassifier(model, 1, arch["pooling"], self.cfg.model.dropout)
        return model, arch

    def final_report(self, model: nn.Module, rt, log, position: dict) -> dict[str, dict]:
        """Full-split metrics of the best checkpoint (else the final weights), logged as `final` events."""
        return final_splits_report(self, model, rt, log, position, format_regression)

    def full_metrics(self, model: nn.Module, dataset, batch_size: int, rt) -> dict | None:
        """MSE (the loss), MAE, RMSE and Pearson r over all of `dataset` (`evaluate_split`)."""
        if len(dataset) == 0:
            return None

        def measure(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            predicted = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0].float()  # (B,)
            return regression_sums(predicted, batch["label"].float())

        sums = {k: float(v) for k, v in evaluation_sums(model, self, dataset, batch_size, rt, measure).items()}
        metrics = regression_metrics(sums)
        return {"loss": metrics["mse"], "samples": int(sums["samples"]), **{k: metrics[k] for k in _SHOWN}}
