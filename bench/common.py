"""What every benchmark shares: the fixed workload's data, interleaved rounds, worker
processes, the measured matmul peak, and the table of medians and ratios.

Rules the benchmarks keep (issue "faster than the peers"): lmforge and its peer run in the
same `make bench` run, interleaved A B A B ... for at least 3 rounds, on the same data and
seeds; a number is the median of per-step (or per-call) rates; only the ratio lmforge / peer
is meant to be compared across machines. Training sides run in their own long-lived worker
process each, so process-wide settings one side makes (allocator thresholds, threads) never
leak into the other; a round is one message to the worker, so the rounds interleave in time.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.environ.get("LMFORGE_BENCH_DIR", ROOT / "runs" / "bench"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))

# The fixed workload.
WORKLOAD = dict(n_layer=4, n_head=4, n_embd=256, context=256, vocab_size=8192, batch_size=8)
SEED = 1337


def log(message: str) -> None:
    print(message, flush=True)


def shakespeare_data() -> Path:
    """Tiny Shakespeare, byte-level BPE with 8192 tokens, prepared for `lm` (built once, cached)."""
    data = BENCH_DIR / "shakespeare-8192"
    if (data / "meta.json").exists():
        return data
    from lmforge.data.prepare import prepare
    from lmforge.commands.quickstart import bundled_corpus
    from lmforge.base.tokenizer import train_tokenizer

    log(f"building the benchmark data in {data} (once)")
    tok = train_tokenizer([bundled_corpus()], kind="bpe", vocab_size=WORKLOAD["vocab_size"],
                          out_dir=BENCH_DIR / "tok-8192")
    with contextlib.redirect_stdout(io.StringIO()):
        prepare("lm", [bundled_corpus()], tok, data, overwrite=True, show_progress=False)
    return data


def matmul_peak(size: int = 2048, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of a size^3 matmul now (not cached): the denominator of MFU in the tables."""
    from lmforge.train.flops import time_matmul

    return time_matmul(size, seconds)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- worker processes ----------------------------------------------------------------------------


def _serve(conn, factory: str, kwargs: dict) -> None:
    """Child side: build the runner once, then run rounds on request (JSON over the pipe)."""
    try:
        module, name = factory.split(":")
        runner = getattr(importlib.import_module(module), name)(**kwargs)
        conn.send_bytes(json.dumps({"ok": True}).encode())
        while True:
            request = json.loads(conn.recv_bytes())
            if request is None:
                return
            conn.send_bytes(json.dumps({"ok": True, "result": runner(**request)}).encode())
    except Exception as err:  # report to the parent instead of dying silently
        import traceback
        conn.send_bytes(json.dumps({"ok": False, "error": f"{err!r}\n{traceback.format_exc()}"}).encode())


class Worker:
    """A side of a comparison in its own process: `factory(**kwargs)` returns `runner(**request)`."""

    def __init__(self, factory: str, **kwargs) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve, args=(child, factory, kwargs), daemon=True)
        self._proc.start()
        self._receive()

    def _receive(self):
        reply = json.loads(self._conn.recv_bytes())
        if not reply["ok"]:
            raise RuntimeError(f"benchmark worker failed:\n{reply['error']}")
        return reply.get("result")

    def __call__(self, **request):
        self._conn.send_bytes(json.dumps(request).encode())
        return self._receive()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send_bytes(json.dumps(None).encode())
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()


# -- interleaving and reporting ------------------------------------------------------------------


_LMFORGE_LINES: list[str] = []  # "lmforge <what>: N <unit>" per round, repeated at the end of the output
ROUND_MEDIANS: dict[str, list[float]] = {}  # per side: the median of each round, for paired ratios


def paired_ratio(a: str, b: str) -> float:
    """Median over rounds of (a's round median / b's round median): each ratio compares two
    measurements taken back to back, so a burst of load from other processes in one round
    moves one ratio, not the result (pooled medians can swing by more than the effect)."""
    pairs = list(zip(ROUND_MEDIANS.get(a, []), ROUND_MEDIANS.get(b, [])))
    return median([x / y for x, y in pairs if y > 0])


def interleave(sides: dict[str, Callable[[], list[float]]], rounds: int, unit: str,
               label: Callable[[str], str] = lambda name: name,
               units: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Run the sides A B A B ... for `rounds` rounds; each call returns per-step rates.

    Prints one line `<label>: N <unit>` per side per round (the round's median) and returns
    every per-step rate of every round, per side."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(1, rounds + 1):
        for name, run in sides.items():
            values = run()
            rates[name].extend(values)
            ROUND_MEDIANS.setdefault(name, []).append(median(values))
            line = f"{label(name)}: {median(values):,.0f} {(units or {}).get(name, unit)}"
            log(f"{line}   (round {r}/{rounds}, median of {len(values)})")
            if line.startswith("lmforge"):
                _LMFORGE_LINES.append(line)
    return rates


def table(title: str, rows: list[tuple[str, float, str]], unit: str, reference: str,
          extra: dict[str, str] | None = None) -> list[str]:
    """Rows (name, median rate, note) as a table with each row's ratio to `reference`: the
    paired ratio (`paired_ratio`) for sides measured in the rounds, else the ratio of medians."""
    ref = dict((name, rate) for name, rate, _ in rows)[reference]
    width = max(44, *(len(name) for name, _, _ in rows))
    lines = [f"## {title}", f"| {'':<{width}} | {unit + ' (median)':>19} | {'ratio':>6} | note",
             f"|{'-' * (width + 2)}|{'-' * 21}|{'-' * 8}|-----"]
    for name, rate, note in rows:
        measured = name in ROUND_MEDIANS and reference in ROUND_MEDIANS
        ratio = paired_ratio(name, reference) if measured else (rate / ref if ref else float("nan"))
        lines.append(f"| {name:<{width}} | {rate:>19,.0f} | {ratio:>5.2f}x | {note}")
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    return lines


def write_summary(name: str, lines: list[str]) -> None:
    """Print the table and keep it in runs/bench/<name>.md for `make bench`'s closing summary."""
    text = "\n".join(lines)
    log("\n" + text + "\n")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    for line in _LMFORGE_LINES:  # the output ends with lmforge's number of every measured round
        log(line)


def machine() -> str:
    import torch

    return (f"{os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")


def race_against(name: str, title: str, data: str, peer: str, unit: str, rate_unit: str, steps: int,
                 warmup: int) -> None:
    """lmforge (`<name>:lmforge_runner`) against `peer` (`<name>:hf_runner`), each in its own
    worker, interleaved for ROUNDS rounds; prints and keeps the table runs/bench/<name>.md."""
    log(f"bench {name} | {machine()} | {ROUNDS} rounds x {steps} steps (+{warmup} warm-up) per side")
    workers = {"lmforge": Worker(f"{name}:lmforge_runner", data=data), peer: Worker(f"{name}:hf_runner", data=data)}
    try:
        rates = interleave({n: (lambda w=w: w(steps=steps)) for n, w in workers.items()}, ROUNDS,
                           unit, label=lambda n: f"lmforge {name}" if n == "lmforge" else n)
    finally:
        for w in workers.values():
            w.close()
    medians = {side: median(values) for side, values in rates.items()}
    write_summary(name, table(title, [(n, r, "") for n, r in medians.items()], rate_unit, peer, extra={
        "lmforge / transformers": f"{paired_ratio('lmforge', peer):.2f}x", "machine": machine()}))


def train_rates(cfg, key: str, warmup: int) -> list[float]:
    """Run `lmforge.train.loop.train(cfg)` (log_every=1) and return the per-step rates `key` it
    logged, less the first `warmup` steps; the run folder is removed."""
    from lmforge.train.loop import train

    shutil.rmtree(Path(cfg.run.out_dir) / cfg.run.name, ignore_errors=True)
    result = train(cfg, quiet=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return [e[key] for e in events if e["event"] == "train"][warmup:]


def loop_runner(make_config: Callable[[int, str], object], key: str, warmup: int):
    """A function(steps) -> per-step rates `key` of `lmforge train` on make_config(steps, run name)."""
    rounds = iter(range(10**6))

    def run(steps: int) -> list[float]:
        return train_rates(make_config(warmup + steps, f"lmforge-{os.getpid()}-{next(rounds)}"), key, warmup)

    return run


def train_split(cfg, data: str) -> tuple:
    """(task, its train dataset, the model's architecture dict, meta.json) for a bench config, as
    `lmforge train` builds them: the peer's loop reads the same samples."""
    from lmforge.data.store import read_meta
    from lmforge.models.registry import architecture
    from lmforge.train.tasks import make_task

    meta = read_meta(Path(data))
    arch = architecture(cfg.model, int(meta["vocab_size"]))
    task = make_task(cfg, meta, arch["context"])
    return task, task.dataset("train"), arch, meta


def transformers_kwargs(hf_config: dict) -> dict:
    """A config.json dict as keyword arguments of a transformers config class."""
    return {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}


def plain_loop_rates(model, optimizer, make_batch: Callable[[int], dict], loss: Callable[[dict], object],
                     count: Callable[[dict], float], steps: int, warmup: int) -> list[float]:
    """A plain training loop, as tutorials write it: collate, loss, backward, clip 1.0, optimizer
    step, the loss read back to log. Returns count(batch) / step time for each of `steps` steps
    after `warmup` more."""
    import torch

    rates = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        batch = make_batch(step)
        value = loss(batch)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value.item()
        rates.append(count(batch) / (time.perf_counter() - start))
    return rates[warmup:]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
