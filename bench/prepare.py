"""Data preparation tokens/s: `lmforge prepare` against transformers' tokenizer + numpy.

Input: tiny Shakespeare repeated COPIES times (plain text, ~2.5M tokens with 8 copies), the
benchmark's byte-level BPE (8192 tokens). Both sides use all cores (the Rust tokenizer's pool).

- lmforge: `lmforge.data.prepare.prepare("lm", ...)`, the whole command's work: reading,
  splitting documents, tokenizing, the train/val split, writing .bin/.idx, meta.json, fsync.
- transformers: `PreTrainedTokenizerFast(tokenizer_file=...)` on the same documents
  (blank-line-separated blocks) in batches of 1000, EOS appended, written with numpy as
  uint16 tokens + int64 offsets: the usual hand-rolled script.

Rate = tokens written / wall time; interleaved A B A B in this process.

    python bench/prepare.py           # BENCH_ROUNDS=3 BENCH_PREPARE_COPIES=8
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys

from common import (BENCH_DIR, ROUNDS, interleave, log, machine, median, paired_ratio, shakespeare_data,
                    table, write_summary)

COPIES = int(os.environ.get("BENCH_PREPARE_COPIES", "8"))


def main() -> None:
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from lmforge.data.prepare import prepare
    from lmforge.commands.quickstart import bundled_corpus

    data = shakespeare_data()
    tok_file = data / "tokenizer.json"
    corpus = BENCH_DIR / f"shakespeare-x{COPIES}.txt"
    text = bundled_corpus().read_text(encoding="utf-8")
    if not corpus.exists():
        corpus.write_text("\n\n".join([text.strip("\n")] * COPIES) + "\n", encoding="utf-8")
    out = BENCH_DIR / "prepare-out"

    def ours() -> list[float]:
        import time
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            meta = prepare("lm", [corpus], tok_file, out / "lmforge", overwrite=True, show_progress=False)
        seconds = time.perf_counter() - start
        return [sum(s["tokens"] for s in meta["splits"].values()) / seconds]

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    eos = hf_tok.convert_tokens_to_ids("<|endoftext|>")

    def theirs() -> list[float]:
        import time
        start = time.perf_counter()
        folder = out / "transformers"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        docs = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        ids: list[np.ndarray] = []
        for i in range(0, len(docs), 1000):
            for row in hf_tok(docs[i:i + 1000], add_special_tokens=False)["input_ids"]:
                ids.append(np.array(row + [eos], dtype=np.uint16))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in ids], out=offsets[1:])
        np.concatenate(ids).tofile(folder / "train.bin")
        offsets.tofile(folder / "train.idx")
        return [int(offsets[-1]) / (time.perf_counter() - start)]

    log(f"bench prepare | {machine()} | {corpus.name}: {corpus.stat().st_size / 1e6:.1f} MB | {ROUNDS} rounds")
    ours(), theirs()  # warm-up (file cache, thread pools)
    rates = interleave({"lmforge": ours, "transformers tokenizer + numpy": theirs}, ROUNDS, "tokens/s",
                       label=lambda n: "lmforge prepare" if n == "lmforge" else n)
    medians = {name: median(values) for name, values in rates.items()}
    ref = "transformers tokenizer + numpy"
    lines = table(f"prepare: byte-level BPE 8192 on {corpus.name} ({corpus.stat().st_size / 1e6:.1f} MB)",
                  [(n, r, "") for n, r in medians.items()], "tokens/s", ref, extra={
                      "lmforge / transformers": f"{paired_ratio('lmforge', ref):.2f}x",
                      "lmforge prepare": f"{medians['lmforge'] / 1e6:.2f}M tokens/s (target >= 1M on 2 cores)",
                      "machine": machine()})
    write_summary("prepare", lines)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
