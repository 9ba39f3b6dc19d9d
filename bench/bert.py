"""BERT pretraining sentence pairs/s: `lmforge train` (task mlm) against `BertForPreTraining`.

configs/bert-wikitext.yaml's model (4 layers, 4 heads, 256 wide, context 128, WordPiece 8000
on WikiText-2 valid + test), batch 32 pairs, fp32, dropout 0.1, MLM + NSP.

- lmforge: the real `lmforge.train.loop.train` (task mlm) with log_every=1; a step's rate is
  the `pairs_per_s` the loop logs.
- transformers: `BertForPreTraining` (the same architecture, via lmforge.models.hf) in a plain
  loop (forward with labels, backward, clip 1.0, fused AdamW step) over the same batches
  (lmforge's sentence pairs and masking); rate = 32 / step time.

Each side in its own worker process, interleaved A B A B; the first WARMUP steps of every
round are dropped.

    python bench/bert.py           # BENCH_ROUNDS=3 BENCH_BERT_STEPS=10
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

from common import (BENCH_DIR, ROOT, SEED, log, loop_runner, plain_loop_rates, race_against, train_split,
                    transformers_kwargs)

STEPS = int(os.environ.get("BENCH_BERT_STEPS", "10"))
WARMUP = 2
BATCH = 32
MODEL = {"kind": "bert", "preset": None, "n_layer": 4, "n_head": 4, "n_embd": 256, "context": 128, "dropout": 0.1}


def wikitext_mlm() -> Path:
    """WikiText-2 (valid + test) as sentence pairs, WordPiece 8000 lowercase (built once)."""
    data = BENCH_DIR / "wikitext2-mlm"
    if (data / "meta.json").exists():
        return data
    from lmforge.data.prepare import prepare
    from lmforge.base.tokenizer import train_tokenizer

    inputs = [ROOT / "datasets" / "wikitext2" / f"wiki.{s}.raw" for s in ("valid", "test")]
    log(f"building the BERT benchmark data in {data} (once)")
    tok = train_tokenizer(inputs, kind="wordpiece", vocab_size=8000, lowercase=True, out_dir=BENCH_DIR / "tok-wordpiece")
    with contextlib.redirect_stdout(io.StringIO()):
        prepare("mlm", inputs, tok, data, overwrite=True, show_progress=False, doc_split="line")
    return data


def _config(data: str, steps: int, name: str):
    from lmforge.base.config import load_config

    return load_config(None, base={
        "model": dict(MODEL), "data": {"path": data},
        "train": {"task": "mlm", "batch_size": BATCH, "grad_accum": 1, "lr": 5e-4, "weight_decay": 0.01,
                  "beta2": 0.999, "warmup_steps": 0, "max_steps": steps, "grad_clip": 1.0, "log_every": 1,
                  "eval_every": 10**9, "eval_batches": 1, "device": "cpu", "precision": "fp32", "seed": SEED},
        "run": {"out_dir": str(BENCH_DIR / "bert-runs"), "name": name}})


def lmforge_runner(data: str):
    return loop_runner(lambda steps, name: _config(data, steps, name), "pairs_per_s", WARMUP)


def hf_runner(data: str):
    import torch
    from transformers import BertConfig, BertForPreTraining

    from lmforge.models.hf import bert_config_to_hf

    cfg = _config(data, 1, "unused")
    task, pairs, arch, meta = train_split(cfg, data)
    hf_config = transformers_kwargs(bert_config_to_hf(arch, meta["special_ids"]["pad"]))

    def run(steps: int) -> list[float]:
        torch.manual_seed(SEED)
        model = BertForPreTraining(BertConfig(**hf_config)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01, fused=True)
        order = torch.randperm(len(pairs)).tolist()

        def loss(batch: dict):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"], labels=batch["labels"],
                         next_sentence_label=batch["next_sentence_label"]).loss

        return plain_loop_rates(model, optimizer,
                                lambda step: task.collate([pairs[i] for i in order[step * BATCH:(step + 1) * BATCH]]),
                                loss, lambda batch: BATCH, steps, WARMUP)

    return run


def main() -> None:
    race_against("bert", "bert: 4 x 256, context 128, WordPiece 8000, batch 32 pairs, fp32, MLM + NSP", str(wikitext_mlm()), "transformers BertForPreTraining, plain loop", "sentence pairs/s", "pairs/s", STEPS, WARMUP)


if __name__ == "__main__":
    sys.exit(main())
