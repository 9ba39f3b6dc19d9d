"""`lmforge embed`: read the texts, embed them (`lmforge.inference.embedder`), and write JSON
(to stdout or a .json file) or the sentence vectors as a .npy array.

Row i of the output is text i: the command-line text first, then every line of `--input`
(`lmforge.commands.files`: a blank line is an empty text and gets its vectors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from lmforge.commands.files import check_output_file, read_input_texts
from lmforge.inference.embedder import Embeddings, embed
from lmforge.inference.loaded import load_for_inference


def embed_command(checkpoint: str | Path, texts: list[str], text_b: str | None = None, *,
                  input_file: Path | None = None, out: Path | None = None, pooling: str = "mean",
                  per_token: bool = False, device: str = "auto", stdout: TextIO | None = None) -> Embeddings:
    """`lmforge embed`: JSON to stdout or `out` (.json), or the sentence vectors as `out` (.npy)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"--pooling {pooling!r}: choose mean or cls")
    if out is not None:
        out = check_output_file(out, "--out", inputs=(input_file,))
        if per_token and out.suffix == ".npy":
            raise ValueError("--per-token vectors have different lengths per text; write them as .json")
    if text_b is not None and (input_file is not None or len(texts) != 1):
        raise ValueError("a second text (sentence B) pairs with one TEXT; it cannot go with --input")
    if input_file is not None:
        texts = texts + read_input_texts(input_file)
    if not texts:
        raise ValueError("nothing to embed: give a TEXT or --input FILE")
    loaded = load_for_inference(checkpoint, device)
    result = embed(loaded, texts, [text_b] if text_b is not None else None)
    if pooling == "cls" and result.cls is None:
        raise ValueError("--pooling cls needs a BERT checkpoint; GPT sentence vectors are mean-pooled")
    vectors = result.cls if pooling == "cls" else result.mean
    if out is not None and out.suffix == ".npy":
        np.save(out, vectors.astype(np.float32))
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {pooling} vectors to {out}", file=sys.stderr)
        return result
    records = []
    for i, text in enumerate(result.texts):
        record = {"text": text, "tokens": result.tokens[i], "mean": result.mean[i].tolist()}
        if result.cls is not None:
            record["cls"] = result.cls[i].tolist()
        if per_token:
            record["token_vectors"] = result.token_vectors[i].tolist()
        records.append(record)
    # one text on the command line: its object; a file of texts: a list, however many lines it has
    payload = json.dumps(records[0] if input_file is None and len(records) == 1 else records)
    if out is not None:
        Path(out).write_text(payload + "\n", encoding="utf-8")
    else:
        (stdout or sys.stdout).write(payload + "\n")
    return result
