"""`lmforge classify`: label texts with a fine-tuned classifier (`lmforge.inference.classifier`)
and print `label<TAB>probability` per text, or write a CSV for a file of texts."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TextIO

from lmforge.base.readers import check_inputs, iter_documents
from lmforge.inference.classifier import load_classifier, predict_texts


def read_texts(path: Path, text_column: str | int = "text") -> list[str]:
    """Texts to classify: one per line (.txt), or a column (.csv/.tsv) or field (.jsonl)."""
    (path,) = check_inputs([path])
    return [doc.text for doc in iter_documents(path, text_field=str(text_column), text_column=text_column,
                                               doc_split="line")]


def classify_command(out: TextIO, checkpoint: str | Path, texts: list[str], *, input_file: Path | None = None,
                     output: Path | None = None, text_column: str | int = "text", batch_size: int = 32,
                     device: str = "auto") -> list[tuple[str, float]]:
    """`lmforge classify`: print `label<TAB>probability` per text; with `input_file`, write a CSV of
    text, label, probability to `output` (or to `out` when no output is given)."""
    if input_file is not None:
        texts = [*texts, *read_texts(input_file, text_column)]
    if not texts:
        raise ValueError("nothing to classify: give a text or --input FILE")
    loaded, labels = load_classifier(checkpoint, device)
    results = predict_texts(loaded, labels, texts, batch_size)
    if input_file is None:
        for label, prob in results:
            out.write(f"{label}\t{prob:.4f}\n")
        return results
    handle = open(output, "w", encoding="utf-8", newline="") if output is not None else out
    try:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "probability"])
        writer.writerows((text, label, f"{prob:.6f}") for text, (label, prob) in zip(texts, results))
    finally:
        if output is not None:
            handle.close()
            print(f"wrote {len(results)} predictions to {output}", file=sys.stderr)
    return results
