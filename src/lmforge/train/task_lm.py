"""The LM task: next-token prediction on a packed token stream (GPT pretraining)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.base.config import Config
from lmforge.data.collate import pad_collate
from lmforge.data.datasets import PackedLMDataset
from lmforge.data.store import TokenStore
from lmforge.inference.generate import SamplingConfig, generate
from lmforge.base.metrics import IGNORE_INDEX, shift_labels
from lmforge.base.tokenizer import load_tokenizer
from lmforge.train.tasks import StepStats, Task


class LMTask(Task):
    """Next-token prediction on a packed token stream (GPT pretraining)."""

    name = "lm"
    throughput_unit = "tok"
    reports_perplexity = True
    model_types = ("gpt", "llama")

    def __init__(self, cfg: Config, meta: dict, context: int):
        self.cfg = cfg
        self.meta = meta
        self.context = context
        self.pad_id = int(meta["special_ids"].get("pad") or 0)

    def dataset(self, split: str) -> PackedLMDataset:
        store = TokenStore(Path(self.cfg.data.path), split)
        return PackedLMDataset(store, self.context)

    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(samples, self.pad_id)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch.get("labels", batch["input_ids"])
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def loss_and_metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepStats:
        mask = batch.get("attention_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the fast causal kernel applies
        return next_token_stats(model, batch["input_ids"], batch.get("labels", batch["input_ids"]), mask)

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return token_means(sums)

    def samples(self, model: nn.Module, runtime) -> list[dict]:
        """A few generations from the configured prompts, for the log and the report."""
        train = self.cfg.train
        if train.sample_tokens == 0 or not train.sample_prompts:
            return []
        tokenizer = load_tokenizer(Path(self.cfg.data.path) / "tokenizer.json")
        stop = [i for i in (self.meta["special_ids"].get("eos"),) if i is not None]
        sampling = SamplingConfig(max_new_tokens=train.sample_tokens, temperature=0.8, top_k=50,
                                  stop_ids=tuple(stop))
        generator = torch.Generator(device=runtime.device).manual_seed(train.seed)
        results = []
        for prompt in train.sample_prompts:
            ids = tokenizer.encode(prompt).ids
            new = generate(model, ids, sampling, generator=generator)
            results.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=False)})
        return results


def next_token_stats(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> StepStats:
    """Summed next-token cross-entropy and accuracy over labels that are not -100 (with the shift).

    The model computes them itself (GPT.forward with targets: the fused output projection and
    cross-entropy), so the (B, T, V) logits never leave it.
    """
    loss_sum, correct, counted = model(input_ids, attention_mask=attention_mask, targets=shift_labels(labels))
    return StepStats(loss_sum=loss_sum, targets=counted, correct=correct)


def token_means(sums: dict[str, float]) -> dict[str, float]:
    """Means from summed statistics: loss per target token and token accuracy."""
    targets = max(1.0, sums.get("targets", 0.0))
    return {"loss": sums["loss_sum"] / targets, "accuracy": sums["correct"] / targets}
