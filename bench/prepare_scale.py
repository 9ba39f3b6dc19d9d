"""`prepare` at corpus scale: tokens/s and peak memory on generated corpora up to ~2 GB.

The corpora are the bundled texts (../shared/data's English and Chinese plain texts, or
tiny Shakespeare alone where that is absent) written one after another, over and over, as
blank-line-separated documents, until each reaches its size (BENCH_PREPARE_SCALE_GB, default
0.1 and 2; written once and kept in runs/bench/prepare-scale/). The tokenizer is the
benchmark's byte-level BPE with 8,192 tokens.

- lmforge: `lmforge.data.prepare.prepare("lm", ...)`: reading, splitting documents,
  tokenizing on all cores, the train/val split, .bin/.idx, meta.json, fsync.
- tokenizers + numpy: the usual hand-rolled script in one process: read the file, split it
  at blank lines, `Tokenizer.encode_batch` in batches of 1,000 documents (all cores), EOS
  appended, uint16 arrays concatenated and written with numpy. It holds the corpus, its
  documents and their ids at once, so its memory grows with the corpus: it runs at the
  sizes up to BENCH_PREPARE_SCALE_PEER_GB (default 0.1: it held about 19x the corpus in memory).

Every measurement runs in a fresh worker process, so its peak resident memory (the process's
high-water mark, less what the process held before the work began: Python and the
libraries) is that run's alone. Time should grow linearly with size and lmforge's memory
stay flat. A single pass per side and size (the largest takes minutes); the run prints how
long it took: about 15 minutes on a quiet 2-core machine at the default sizes (2 GB is ~1.3G tokens).

    python bench/prepare_scale.py      # BENCH_PREPARE_SCALE_GB=0.1,2 BENCH_PREPARE_SCALE_PEER_GB=0.1
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

from common import BENCH_DIR, ROOT, Worker, log, machine, shakespeare_data, write_summary

SIZES_GB = [float(s) for s in os.environ.get("BENCH_PREPARE_SCALE_GB", "0.1,2").split(",") if s]
PEER_GB = float(os.environ.get("BENCH_PREPARE_SCALE_PEER_GB", "0.1"))
FOLDER = BENCH_DIR / "prepare-scale"
TEXTS = ["wikitext2/wiki.valid.raw", "wikitext2/wiki.test.raw", "tinyshakespeare/input.txt",
         "dailydialog/dialogues_validation.txt", "dailydialog/dialogues_test.txt",
         "chitchat_zh/gpt2chitchat_50w_part0.txt"]


def corpus(gigabytes: float) -> Path:
    """The generated corpus of about `gigabytes` GB (written once, streamed: never all in memory)."""
    path = FOLDER / f"corpus-{gigabytes:g}GB.txt"
    if path.exists():
        return path
    from lmforge.commands.quickstart import bundled_corpus

    shared = ROOT.parent / "shared" / "data"
    sources = [shared / t for t in TEXTS if (shared / t).is_file()] or [bundled_corpus()]
    pieces = [s.read_text(encoding="utf-8").strip("\n") + "\n\n" for s in sources]
    target = int(gigabytes * 1e9)
    log(f"writing {path} ({gigabytes:g} GB from {len(sources)} texts, once)")
    FOLDER.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            for piece in pieces:
                f.write(piece)
                written += len(piece.encode("utf-8"))
    tmp.replace(path)
    return path


def _rss_mib() -> float:
    """This process's high-water mark now, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lmforge_runner(tokenizer: str):
    from lmforge.data.prepare import prepare

    def run(path: str, out: str) -> dict:
        before = _rss_mib()
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            meta = prepare("lm", [Path(path)], Path(tokenizer), Path(out), overwrite=True, show_progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        return {"tokens": tokens, "seconds": seconds, "peak_mib": _rss_mib(), "base_mib": before}

    return run


def peer_runner(tokenizer: str):
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    eos = tok.token_to_id("<|endoftext|>")

    def run(path: str, out: str) -> dict:
        before = _rss_mib()
        start = time.perf_counter()
        Path(out).mkdir(parents=True, exist_ok=True)
        docs = [d for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()]
        ids: list = []
        for i in range(0, len(docs), 1000):
            for enc in tok.encode_batch(docs[i:i + 1000], add_special_tokens=False):
                ids.append(np.array(enc.ids + [eos], dtype=np.uint16))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in ids], out=offsets[1:])
        np.concatenate(ids).tofile(Path(out) / "train.bin")
        offsets.tofile(Path(out) / "train.idx")
        seconds = time.perf_counter() - start
        return {"tokens": int(offsets[-1]), "seconds": seconds, "peak_mib": _rss_mib(), "base_mib": before}

    return run


def measure(side: str, tokenizer: str, path: Path) -> dict:
    """One pass of `side` on `path` in a fresh worker process; its output folder is removed after."""
    out = FOLDER / f"out-{side}"
    shutil.rmtree(out, ignore_errors=True)
    worker = Worker(f"prepare_scale:{side}_runner", tokenizer=tokenizer)
    try:
        result = worker(path=str(path), out=str(out))
    finally:
        worker.close()
        shutil.rmtree(out, ignore_errors=True)
    rate = result["tokens"] / result["seconds"]
    log(f"{'lmforge prepare' if side == 'lmforge' else 'tokenizers + numpy'} {path.name}: {rate:,.0f} tokens/s, "
        f"{result['seconds']:.1f} s, peak {result['peak_mib']:,.0f} MiB ({result['base_mib']:,.0f} before)")
    return {**result, "side": side, "gb": path.stat().st_size / 1e9, "rate": rate}


def report(rows: list[dict], seconds: float) -> list[str]:
    lines = ["## prepare at scale: generated corpora, byte-level BPE 8192, one pass each",
             "| corpus | side | tokens | seconds | tokens/s | peak memory | of which the work | lmforge / this |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    ours = {round(r["gb"], 2): r for r in rows if r["side"] == "lmforge"}
    for r in rows:
        name = "lmforge prepare" if r["side"] == "lmforge" else "tokenizers + numpy"
        mine = ours.get(round(r["gb"], 2))
        ratio = f"{mine['rate'] / r['rate']:.2f}x" if mine and r["side"] != "lmforge" else ""
        lines.append(f"| {r['gb']:.2f} GB | {name} | {r['tokens']:,} | {r['seconds']:.1f} | {r['rate']:,.0f} | "
                     f"{r['peak_mib']:,.0f} MiB | {r['peak_mib'] - r['base_mib']:,.0f} MiB | {ratio} |")
    sizes = sorted(ours)
    if len(sizes) > 1:
        small, large = ours[sizes[0]], ours[sizes[-1]]
        lines.append(f"lmforge, {large['gb']:.2f} GB against {small['gb']:.2f} GB: "
                     f"{large['gb'] / small['gb']:.2f}x the bytes, {large['seconds'] / small['seconds']:.2f}x the "
                     f"time, {large['peak_mib'] / small['peak_mib']:.2f}x the peak memory")
    lines.append(f"took {seconds / 60:.1f} min; machine: {machine()}")
    return lines


def main() -> None:
    start = time.perf_counter()
    tokenizer = str(shakespeare_data() / "tokenizer.json")
    paths = [corpus(gb) for gb in SIZES_GB]
    log(f"bench prepare-scale | {machine()} | corpora {[p.name for p in paths]}")
    rows = []
    for gb, path in zip(SIZES_GB, paths):
        rows.append(measure("lmforge", tokenizer, path))
        if gb <= PEER_GB:
            rows.append(measure("peer", tokenizer, path))
    write_summary("prepare_scale", report(rows, time.perf_counter() - start))


if __name__ == "__main__":
    sys.exit(main())
