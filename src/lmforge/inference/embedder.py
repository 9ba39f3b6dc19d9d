"""Embeddings from a BERT or GPT checkpoint: per-token vectors and sentence vectors.

Owns `encode_texts` (texts -> token ids, the way each model family expects them), `embed`
(hidden states of the last layer and their pooled vectors) and `Embeddings`, what it returns.

BERT: `[CLS] A [SEP]` (or `[CLS] A [SEP] B [SEP]` with segment ids 0/1 for a pair); sentence
vectors are the [CLS] hidden state (`cls`, as HF's last_hidden_state[:, 0], not the pooler)
and the mean over real tokens (`mean`, specials included, as sentence-transformers pools).
GPT: the text's tokens as they are (a pair joined by the end-of-text token); the sentence
vector is the mean of the last hidden states (after ln_f) over the tokens.

Every text gets its vectors, the empty one too (BERT: `[CLS] [SEP]`; GPT: the end-of-text
token alone, the state a new document starts from), so result row i is always text i.
A classifier checkpoint is refused: its backbone was tuned for its labels, not for embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.collate import pad_collate
from lmforge.data.mlm import truncate_pair
from lmforge.inference.checks import check_count, check_text
from lmforge.inference.loaded import LoadedModel
from lmforge.models.bert import BertConfig


@dataclass
class Embeddings:
    """Per text: its tokens, per-token vectors (T, C) and sentence vectors (C,)."""

    texts: list[str]
    tokens: list[list[str]]
    token_vectors: list[np.ndarray]
    mean: np.ndarray  # (N, C)
    cls: np.ndarray | None  # (N, C), BERT only


def encode_texts(loaded: LoadedModel, texts: list[str], texts_b: list[str] | None = None) -> list[dict]:
    """Token ids (+ segment ids) for each text (or pair), truncated to the model context."""
    tok, sp = loaded.tokenizer, loaded.specials
    context = loaded.model.config.context
    is_bert = isinstance(loaded.model.config, BertConfig)
    if is_bert and (sp.cls is None or sp.sep is None):
        raise ValueError(f"{loaded.path}: a BERT checkpoint whose tokenizer has no [CLS]/[SEP] tokens; a BERT "
                         "reads [CLS] text [SEP]: train it with a WordPiece tokenizer (--kind wordpiece)")
    samples = []
    for i, text in enumerate(texts):
        a = tok.encode(check_text(text, f"text {i + 1}")).ids
        b = tok.encode(check_text(texts_b[i], f"second text {i + 1}")).ids if texts_b is not None else None
        if is_bert:
            budget = context - (3 if b is not None else 2)
            la, lb = truncate_pair(len(a), len(b), budget) if b is not None else (min(len(a), budget), 0)
            a, b = a[:la], (b[:lb] if b is not None else None)
            ids = [sp.cls] + a + [sp.sep]
            types = [0] * len(ids)
            if b is not None:
                ids += b + [sp.sep]
                types += [1] * (len(b) + 1)
        else:
            joiner = [sp.eos] if sp.eos is not None else []
            ids = (a + (joiner + b if b is not None else []))[:context] or joiner
            types = [0] * len(ids)
        if not ids:
            raise ValueError(f"text {i + 1} ({text!r}) has no tokens, and this tokenizer has no end-of-text "
                             "token to stand for an empty text; give some text")
        samples.append({"input_ids": torch.tensor(ids), "token_type_ids": torch.tensor(types)})
    return samples


def check_embedder(loaded: LoadedModel) -> None:
    """A ValueError unless the checkpoint is a BERT, a GPT or a Llama (what `embed` takes)."""
    kind = loaded.architecture.get("model_type")
    if kind not in ("bert", "gpt", "llama"):
        raise ValueError(f"{loaded.path}: a {kind!r} checkpoint; embed takes a BERT, GPT or Llama checkpoint (a "
                         "pretrained, imported or language-model run), not a fine-tuned classifier: use "
                         "`lmforge classify` for that, or embed with the checkpoint it was fine-tuned from")


@torch.inference_mode()
def embed(loaded: LoadedModel, texts: list[str], texts_b: list[str] | None = None,
          batch_size: int = 32) -> Embeddings:
    """Hidden states of the last layer for each text (or pair A/B) and their pooled vectors."""
    if texts_b is not None and len(texts_b) != len(texts):
        raise ValueError(f"{len(texts)} first texts but {len(texts_b)} second texts; give one B per A")
    check_count(batch_size, "batch_size")
    check_embedder(loaded)
    is_bert = isinstance(loaded.model.config, BertConfig)
    samples = encode_texts(loaded, texts, texts_b)
    pad = loaded.specials.pad if loaded.specials.pad is not None else 0
    token_vectors, means, clss = [], [], []
    for start in range(0, len(samples), batch_size):
        batch = pad_collate(samples[start:start + batch_size], pad)
        batch = {k: v.to(loaded.device) for k, v in batch.items()}
        mask = batch["attention_mask"]  # (B, T)
        if is_bert:
            hidden = loaded.model.hidden_states(batch["input_ids"], mask, batch["token_type_ids"])  # (B, T, C)
        else:
            hidden = loaded.model.hidden_states(batch["input_ids"], mask)  # (B, T, C)
        hidden = hidden.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        means.append((hidden * weights).sum(1) / weights.sum(1))  # (B, C)
        clss.append(hidden[:, 0])  # (B, C)
        for row, n in zip(hidden, mask.sum(1).tolist()):
            token_vectors.append(row[:n].cpu().numpy())
    tokens = [[loaded.tokenizer.id_to_token(int(i)) for i in s["input_ids"]] for s in samples]
    return Embeddings(texts=list(texts), tokens=tokens, token_vectors=token_vectors,
                      mean=torch.cat(means).cpu().numpy(), cls=torch.cat(clss).cpu().numpy() if is_bert else None)
