"""nanoGPT as a benchmark peer: its `train.py` run unmodified, and its model in a plain loop.

nanoGPT (github.com/karpathy/nanoGPT, MIT) lies unmodified in ../shared/peers/nanoGPT (its
README there names the commit). Nothing of it is copied here; it is run or imported.

- `train_py_runner`: nanoGPT's own `train.py` in a child process per round, in a folder that
  links its train.py, model.py and configurator.py and holds `data/lmforge/{train,val}.bin`
  (the uint16 token stream lmforge trains on) and `meta.pkl` (the only place train.py reads
  the vocabulary size from: one int, written here as nanoGPT expects it). It runs as its
  README says to on a CPU: `--device=cpu --compile=False`, fp32 (its train.py has no CPU
  autocast), GPT-2's biases (`--bias=True`), dropout 0, no gradient accumulation, clipping
  1.0, its non-fused CPU AdamW. A step's rate is batch x block over the `time ...ms` train.py
  prints for the iteration (the wall time between consecutive iterations); its peak memory is
  the child's high-water mark.
- `model_loop_runner`: nanoGPT's `GPT` with the same AdamW groups, fused (the ablation
  "nanoGPT's model with fused AdamW + torch.compile + malloc tuning in a plain loop").
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, SEED, plain_loop_rates

NANOGPT = Path(os.environ.get("LMFORGE_NANOGPT", ROOT.parent / "shared" / "peers" / "nanoGPT"))
ABSENT = f"not run: nanoGPT is not at {NANOGPT} (../shared/peers/nanoGPT; LMFORGE_NANOGPT=path)"
ITER_LINE = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", re.MULTILINE)


def available() -> bool:
    return all((NANOGPT / f).is_file() for f in ("train.py", "model.py", "configurator.py"))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nanogpt_folder(data: Path, vocab_size: int, parent: Path | None = None) -> Path:
    """A new folder (in `parent`, else the temporary folder) train.py can run in, on lmforge's
    token stream of `data`: links and one small file."""
    import json
    import pickle  # nanoGPT's train.py reads its vocabulary size from meta.pkl and nowhere else

    meta = json.loads((Path(data) / "meta.json").read_text())
    if meta["dtype"] != "uint16":
        raise ValueError(f"nanoGPT reads uint16 tokens; {data} holds {meta['dtype']}")
    work = Path(tempfile.mkdtemp(prefix="nanogpt-", dir=parent))
    for name in ("train.py", "model.py", "configurator.py"):
        (work / name).symlink_to(NANOGPT / name)
    (work / "data" / "lmforge").mkdir(parents=True)
    for split in ("train", "val"):
        (work / "data" / "lmforge" / f"{split}.bin").symlink_to(Path(data).resolve() / f"{split}.bin")
    with open(work / "data" / "lmforge" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": int(vocab_size)}, f)
    return work


def parse_iter_times(log_text: str) -> list[float]:
    """Seconds per iteration, in order, from train.py's `iter N: loss L, time Tms, ...` lines."""
    return [float(ms) / 1e3 for _, ms in ITER_LINE.findall(log_text)]


def train_py_args(model: dict, batch: int, iterations: int) -> list[str]:
    settings = dict(dataset="lmforge", device="cpu", compile=False, dtype="float32", bias=True, dropout=0.0,
                    batch_size=batch, block_size=model["context"], n_layer=model["n_layer"],
                    n_head=model["n_head"], n_embd=model["n_embd"], gradient_accumulation_steps=1,
                    max_iters=iterations - 1, eval_interval=10**9, eval_iters=1, log_interval=1,
                    always_save_checkpoint=False, learning_rate=6e-4, decay_lr=False, grad_clip=1.0,
                    out_dir="out")
    return [f"--{k}={v}" for k, v in settings.items()]


def train_py_runner(data: str, model: dict, batch: int, warmup: int):
    """A function(steps) -> {"rates": tokens/s per iteration after `warmup`, "peak_mib"}."""
    import json

    vocab = json.loads((Path(data) / "meta.json").read_text())["vocab_size"]
    work = nanogpt_folder(Path(data), vocab)

    def run(steps: int) -> dict:
        command = [sys.executable, "train.py", *train_py_args(model, batch, warmup + steps)]
        proc = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own high-water mark
        proc.returncode = os.waitstatus_to_exitcode(status)
        times = parse_iter_times(output)
        if proc.returncode != 0 or len(times) < warmup + steps:
            raise RuntimeError(f"nanoGPT train.py failed (exit {proc.returncode}):\n{output[-3000:]}")
        tokens = batch * model["context"]
        return {"rates": [tokens / t for t in times[warmup:]], "peak_mib": usage.ru_maxrss / 1024}

    return run


def model_loop_runner(data: str, model: dict, batch: int, warmup: int, compile: bool = True,
                      malloc_tuning: bool = True, precision: str = "fp32"):
    """A function(steps) -> {"rates", "peak_mib"}: nanoGPT's GPT, fused AdamW, a plain loop."""
    import contextlib

    import numpy as np
    import torch

    if malloc_tuning:
        from lmforge.base.runtime import keep_freed_memory

        keep_freed_memory()
    sys.path.insert(0, str(NANOGPT))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    from lmforge.data.store import TokenStore

    tokens = TokenStore(Path(data), "train").tokens
    T = model["context"]
    vocab = int(__import__("json").loads((Path(data) / "meta.json").read_text())["vocab_size"])
    torch.manual_seed(SEED)
    net = GPT(GPTConfig(block_size=T, vocab_size=vocab, n_layer=model["n_layer"], n_head=model["n_head"],
                        n_embd=model["n_embd"], dropout=0.0, bias=True))
    # nanoGPT's weight-decay groups; it asks for the fused kernel on CUDA only, fused here on purpose
    optimizer = net.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda")
    forward = torch.compile(net) if compile else net
    blocks = (len(tokens) - 1) // (T + 1)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def make_batch(step: int) -> dict:
        rows = [(step * batch + i) % blocks * (T + 1) for i in range(batch)]
        ids = torch.from_numpy(np.stack([np.asarray(tokens[r:r + T + 1], dtype=np.int64) for r in rows]))
        return {"x": ids[:, :-1].contiguous(), "y": ids[:, 1:].contiguous()}

    def loss(b: dict):
        with autocast:
            return forward(b["x"], b["y"])[1]

    def run(steps: int) -> dict:
        rates = plain_loop_rates(net, optimizer, make_batch, loss, lambda b: b["x"].numel(), steps, warmup)
        return {"rates": rates, "peak_mib": peak_mib()}

    return run
