"""`lmforge quickstart`: the bundled Shakespeare -> tokenizer -> token store -> small GPT (or, with
`--arch llama`, a Llama-class decoder) -> samples -> report."""

from __future__ import annotations

import math
import time
from importlib import resources
from pathlib import Path

import torch

from lmforge.base.config import load_config
from lmforge.base.outputs import check_output_folder

# A model that learns visible structure (speaker names, verse lines) in minutes on 2 CPU cores.
QUICKSTART_MODEL = {"preset": None, "n_layer": 4, "n_head": 4, "n_embd": 192, "context": 128}
QUICKSTART_ARCH = {"gpt": {"kind": "gpt"}, "llama": {"kind": "llama", "n_kv_head": 2}}
"""What --arch adds: the same size either way, the Llama with 2 key / value heads for 4 query heads."""
QUICKSTART_TRAIN = {"batch_size": 16, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.1,
                    "log_every": 25, "eval_every": 200, "eval_batches": 20, "seed": 1337,
                    "sample_prompts": ["ROMEO:\n", "First Citizen:\n", "KING HENRY:\n"], "sample_tokens": 120}


def bundled_corpus() -> Path:
    return Path(str(resources.files("lmforge") / "assets" / "tinyshakespeare.txt"))


def quickstart(out: Path, minutes: float = 3.0, arch: str = "gpt") -> dict:
    """Run the whole pipeline in `out`; returns the final validation metrics.

    `out` gets tokenizer/, data/ and gpt/ or llama/ (the run, by `arch`); run again, the quickstart
    replaces its own three folders, and refuses before any work where one of them holds something else."""
    from lmforge.data.prepare import prepare
    from lmforge.report import write_report
    from lmforge.base.tokenizer import train_tokenizer
    from lmforge.train.loop import train

    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes < math.inf:
        raise ValueError(f"--minutes {minutes!r}: must be a number of minutes > 0")
    if arch not in QUICKSTART_ARCH:
        raise ValueError(f"--arch {arch!r}: choose one of {', '.join(QUICKSTART_ARCH)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder")
    for name, kind in (("tokenizer", "tokenizer"), ("data", "data"), (arch, "run")):
        check_output_folder(out / name, overwrite=True, kind=kind, flag="the quickstart folder")
    started = time.perf_counter()
    corpus = bundled_corpus()
    print(f"[1/4] tokenizer: byte-level BPE on {corpus.name}")
    tokenizer = train_tokenizer([corpus], kind="bpe", vocab_size=2048, out_dir=out / "tokenizer", overwrite=True)
    print("[2/4] token store")
    prepare("lm", [corpus], tokenizer, out / "data", val_fraction=0.1, seed=1337, overwrite=True,
            doc_split="file")
    base = {"model": {**QUICKSTART_MODEL, **QUICKSTART_ARCH[arch]}, "data": {"path": str(out / "data")},
            "train": dict(QUICKSTART_TRAIN), "run": {"out_dir": str(out), "name": arch}}
    steps = _steps_for_budget(base, minutes * 60)
    base["train"].update(max_steps=steps, max_time=minutes * 60 * 1.5)
    cfg = load_config(None, base=base)
    if cfg.run_dir.exists():
        import shutil
        shutil.rmtree(cfg.run_dir)
    print(f"[3/4] training a {cfg.model.n_layer}-layer {'GPT' if arch == 'gpt' else 'Llama'} for {steps} steps "
          f"(~{minutes:g} min)")
    result = train(cfg)
    print("[4/4] report")
    report = write_report(result.run_dir)
    final = result.last_eval
    print(f"\nvalidation loss {final.get('loss', float('nan')):.3f} (perplexity {final.get('perplexity', float('nan')):.1f}) "
          f"after {result.steps} steps; total time {time.perf_counter() - started:.0f}s")
    print(f"report: {report}")
    print(f"try:    lmforge generate {result.run_dir} --prompt 'ROMEO:' --top-k 40")
    return final


def _steps_for_budget(base: dict, seconds: float) -> int:
    """Time a few optimizer steps of this model on this machine and fit the step count to the budget."""
    from lmforge.models.registry import architecture, model_from_architecture
    from lmforge.train.optim import build_optimizer

    cfg = load_config(None, base=base)
    from lmforge.data.store import read_meta
    vocab = int(read_meta(Path(cfg.data.path))["vocab_size"])
    torch.manual_seed(0)
    model = model_from_architecture(architecture(cfg.model, vocab))
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    batch = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.context))

    def one_step() -> None:
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()
    start = time.perf_counter()
    for _ in range(5):
        one_step()
    per_step = (time.perf_counter() - start) / 5
    # Evaluations, checkpoints and samples take about a tenth of the budget.
    return max(50, int(seconds * 0.9 / per_step))
