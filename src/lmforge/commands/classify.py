"""`lmforge classify`: label texts with a fine-tuned classifier (`lmforge.inference.classifier`)
and print `label<TAB>probability` per text (a regression head: the predicted value), or write a
CSV for a file of texts.

Row i of the output is text i: every line (or record, or row) of `--input` is one text, a
blank line an empty text that is classified too (`lmforge.commands.files`)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TextIO

from lmforge.commands.files import check_output_file, read_input_texts
from lmforge.inference.checks import check_count
from lmforge.inference.classifier import load_classifier, predict_texts, predict_values
from lmforge.models.heads import is_regression


def classify_command(out: TextIO, checkpoint: str | Path, texts: list[str], *, input_file: Path | None = None,
                     output: Path | None = None, text_column: str | int = "text", batch_size: int = 32,
                     device: str = "auto") -> list[tuple[str, float]] | list[float]:
    """`lmforge classify`: print `label<TAB>probability` per text (a regression head: the value);
    with `input_file`, write a CSV of text, label, probability (text, value) to `output` (or to
    `out` when no output is given)."""
    check_count(batch_size, "--batch-size")
    if output is not None:
        output = check_output_file(output, "--output", inputs=(input_file,))
    if input_file is not None:
        texts = [*texts, *read_input_texts(input_file, text_column)]
    if not texts:
        raise ValueError("nothing to classify: give a text or --input FILE")
    loaded, labels = load_classifier(checkpoint, device)
    regression = is_regression(loaded.architecture)
    results = predict_values(loaded, texts, batch_size) if regression else predict_texts(loaded, labels, texts, batch_size)
    if input_file is None:
        for result in results:
            out.write(f"{result:.6g}\n" if regression else f"{result[0]}\t{result[1]:.4f}\n")
        return results
    rows = [(f"{value:.8g}",) for value in results] if regression else \
        [(label, f"{prob:.6f}") for label, prob in results]
    handle = open(output, "w", encoding="utf-8", newline="") if output is not None else out
    try:
        writer = csv.writer(handle)
        writer.writerow(["text", "value"] if regression else ["text", "label", "probability"])
        writer.writerows((text, *row) for text, row in zip(texts, rows))
    finally:
        if output is not None:
            handle.close()
            print(f"wrote {len(results)} predictions to {output}", file=sys.stderr)
    return results
