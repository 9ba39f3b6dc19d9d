"""Dialogue fine-tuning tokens/s: `lmforge train` (task dialogue) against `GPT2LMHeadModel`.

configs/chitchat-zh.yaml's model (GPT-2, 4 layers, 4 heads, 192 wide, context 128, WordPiece
8000 on the bundled LCCC chit-chat), batch 32 dialogues right-padded, fp32, dropout 0.1,
`loss_on: responses`: the user's turns and the padding carry the label -100.

- lmforge: the real `lmforge.train.loop.train` with log_every=1; a step's rate is the
  `tokens_per_s` the loop logs (real tokens, padding not counted).
- transformers: `GPT2LMHeadModel` (the same architecture, via lmforge.models.hf) in
  GPT2-chitchat's plain loop (input ids and labels, backward, clip 1.0, fused AdamW step) over
  the same batches in the same order; rate = the batch's real tokens / step time.

Each side in its own worker process, interleaved A B A B; the first WARMUP steps of every
round are dropped.

    python bench/dialogue.py           # BENCH_ROUNDS=3 BENCH_DIALOGUE_STEPS=10
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

from common import (BENCH_DIR, ROOT, SEED, log, loop_runner, plain_loop_rates, race_against, train_split,
                    transformers_kwargs)

STEPS = int(os.environ.get("BENCH_DIALOGUE_STEPS", "10"))
WARMUP = 2
BATCH = 32
MODEL = {"kind": "gpt", "preset": None, "n_layer": 4, "n_head": 4, "n_embd": 192, "context": 128, "dropout": 0.1}
PEER = "transformers GPT2LMHeadModel, plain loop"


def chitchat() -> Path:
    """The bundled Chinese chit-chat dialogues, WordPiece 8000 (built once)."""
    data = BENCH_DIR / "chitchat-zh"
    if (data / "meta.json").exists():
        return data
    from lmforge.data.prepare import prepare
    from lmforge.base.tokenizer import train_tokenizer

    inputs = [ROOT / "datasets" / "chitchat_zh" / f"{s}.txt" for s in ("train", "valid")]
    log(f"building the dialogue benchmark data in {data} (once)")
    tok = train_tokenizer(inputs, kind="wordpiece", vocab_size=8000, out_dir=BENCH_DIR / "tok-chitchat",
                          show_progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare("dialogue", inputs, tok, data, overwrite=True, show_progress=False)
    return data


def _config(data: str, steps: int, name: str):
    from lmforge.base.config import load_config

    return load_config(None, base={
        "model": dict(MODEL), "data": {"path": data},
        "train": {"task": "dialogue", "loss_on": "responses", "batch_size": BATCH, "grad_accum": 1, "lr": 2e-3,
                  "warmup_steps": 0, "max_steps": steps, "grad_clip": 1.0, "log_every": 1, "eval_every": 10**9,
                  "eval_batches": 1, "sample_tokens": 0, "device": "cpu", "precision": "fp32", "seed": SEED},
        "run": {"out_dir": str(BENCH_DIR / "dialogue-runs"), "name": name}})


def lmforge_runner(data: str):
    return loop_runner(lambda steps, name: _config(data, steps, name), "tokens_per_s", WARMUP)


def hf_runner(data: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.models.hf import gpt2_config_to_hf
    from lmforge.train.data_order import epoch_permutation

    cfg = _config(data, 1, "unused")
    task, dialogues, arch, meta = train_split(cfg, data)
    hf_config = transformers_kwargs(gpt2_config_to_hf(arch, None, None, None))

    def run(steps: int) -> list[float]:
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(GPT2Config(**hf_config)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
        order = epoch_permutation(len(dialogues), SEED, 0).tolist()  # lmforge's first epoch: the same batches
        return plain_loop_rates(model, optimizer,
                                lambda step: task.collate([dialogues[i] for i in order[step * BATCH:(step + 1) * BATCH]]),
                                lambda batch: model(input_ids=batch["input_ids"], labels=batch["labels"]).loss,
                                task.count_tokens, steps, WARMUP)

    return run


def main() -> None:
    race_against("dialogue", "dialogue: GPT-2 4 x 192, context 128, WordPiece 8000, batch 32, fp32, loss on replies", str(chitchat()), PEER, "tokens/s", "tokens/s", STEPS, WARMUP)


if __name__ == "__main__":
    sys.exit(main())
