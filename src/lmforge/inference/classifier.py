"""Using a fine-tuned classifier: `load_classifier` (a checkpoint and its label names) and
`predict_texts` (label and probability per text, encoded as `prepare --task classify` does),
`class_probabilities` (every label's probability); for a regression head (no label names)
`predict_values` (the predicted number per text)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.inference.checks import check_count, check_text
from lmforge.inference.loaded import LoadedModel, load_for_inference
from lmforge.models.heads import is_regression, label_names_of


def load_classifier(checkpoint: str | Path, device: str = "auto") -> tuple[LoadedModel, list[str]]:
    """A classifier checkpoint (or run folder) ready to predict, and its label names."""
    loaded = load_for_inference(checkpoint, device)
    arch = loaded.architecture
    if arch.get("model_type") != "classifier":
        raise ValueError(f"{loaded.path}: a {arch.get('model_type')!r} checkpoint, not a classifier; "
                         "fine-tune one with train.task=classify")
    loaded.tokenizer.no_truncation()
    loaded.tokenizer.no_padding()
    return loaded, label_names_of(arch)


def predict_texts(loaded: LoadedModel, label_names: list[str], texts: list[str],
                  batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability of that label) for every text, encoded as `prepare --task classify` does.

    An empty text is classified too (GPT: the end-of-text token alone; BERT: `[CLS] [SEP]`), so
    result i is always text i."""
    if is_regression(loaded.architecture):
        raise ValueError(f"{loaded.path}: a regression head predicts a number, not a label; use predict_values")
    probs, best = class_probabilities(loaded, texts, batch_size).max(dim=-1)  # (N,), (N,)
    return [(label_names[k], float(p)) for k, p in zip(best.tolist(), probs.tolist())]


def predict_values(loaded: LoadedModel, texts: list[str], batch_size: int = 32) -> list[float]:
    """The predicted number for every text under a regression head (`prepare --regression`)."""
    if not is_regression(loaded.architecture):
        raise ValueError(f"{loaded.path}: a classifier for labels {label_names_of(loaded.architecture)}, "
                         "not a regression head; use predict_texts")
    return head_outputs(loaded, texts, batch_size)[:, 0].tolist()


def class_probabilities(loaded: LoadedModel, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The probability of every label for every text, (N, labels) in float32 on the CPU."""
    return head_outputs(loaded, texts, batch_size).softmax(dim=-1)  # (N, L)


@torch.inference_mode()
def head_outputs(loaded: LoadedModel, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The head's outputs (logits; a regression head's value) for every text, (N, num_labels)
    float32 on the CPU."""
    check_count(batch_size, "batch_size")
    for i, text in enumerate(texts):
        check_text(text, f"text {i + 1}")
    specials, context = loaded.specials, loaded.model.config.context
    wrap = specials.cls is not None and specials.sep is not None
    pad = specials.pad if specials.pad is not None else 0
    results: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        encoded = loaded.tokenizer.encode_batch(texts[start:start + batch_size], add_special_tokens=False)
        rows = []
        for enc in encoded:
            ids = [specials.cls, *enc.ids[:context - 2], specials.sep] if wrap else \
                (enc.ids[:context] or [specials.eos if specials.eos is not None else pad])
            rows.append(ids)
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
        logits = loaded.model(input_ids.to(loaded.device), attention_mask=mask.to(loaded.device))  # (B, L)
        results.append(logits.float().cpu())  # (B, L)
    return torch.cat(results) if results else torch.zeros((0, int(loaded.architecture["num_labels"])))
