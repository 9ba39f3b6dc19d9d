"""Perplexity and bits per byte of raw text under a causal language model, with a sliding window.

Owns the windows and the scoring. The definition is the one of transformers' guide "Perplexity
of fixed-length models": the token ids of the whole text are cut into windows of the model's
context that start every `stride` tokens; each window scores only the tokens the previous one
did not reach (the overlap is context, as a label of -100 would make it), and a window's first
token is scored only where it has a predecessor inside the window. With stride < context every
token but the text's first is scored exactly once, with at least context - stride tokens before
it where the text has them; with stride = context the windows are disjoint and the first token
of each is not scored.

    perplexity    = exp(total NLL / scored tokens)          (NLL in nats, natural log)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the text

The guide's own snippet sums each window's mean loss weighted by its scored tokens minus one;
that is the total NLL for disjoint windows and the first window, and slightly off for the later
windows of an overlapping pass, so here the per-token NLLs are summed instead (the exact mean).

A text is one input file: a .txt file whole, the documents of a .jsonl / .csv / .tsv / Parquet /
Arrow file joined by a blank line ("\\n\\n", as the guide joins WikiText's rows). Its ids are
those `AutoTokenizer(text)` gives on the exported model: the text's tokens, with the BOS (and
EOS) the checkpoint's tokenizer folder adds to every text (a Llama-class tokenizer's BOS; none
for GPT-2), `lmforge.base.tokenizer_config`. The text is tokenized in pieces of about 1 MiB cut
after a line end between two non-space characters (byte-level BPE and WordPiece split there
anyway, so the ids are those of the whole text). Windows are run in batches, the log-softmax
in float32 and the sums in float64.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.base.readers import check_inputs, input_format, iter_documents
from lmforge.base.sources import iter_chunks
from lmforge.base.tokenizer_config import added_ids, tokenizer_settings
from lmforge.inference.loaded import LoadedModel

_PIECE_CHARS = 1 << 20
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_LOGITS_BUDGET = 1 << 27  # floats of logits per forward pass (512 MiB in float32)


@dataclass
class TextScore:
    """The NLL of one text (or of several, summed) under a model."""

    name: str
    tokens: int  # token ids of the text
    scored: int  # tokens whose NLL is counted
    nll: float  # total negative log-likelihood of the scored tokens, in nats
    bytes: int  # UTF-8 bytes of the text

    @property
    def mean_nll(self) -> float:
        return self.nll / self.scored if self.scored else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.scored else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def as_dict(self) -> dict:
        return {"text": self.name, "tokens": self.tokens, "scored": self.scored, "bytes": self.bytes,
                "nll": self.nll, "mean_nll": self.mean_nll, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every window over `n_tokens` ids, as the guide
    slides them: a window starts every `stride` tokens and scores from where the last one ended."""
    if not 1 <= stride <= context:
        raise ValueError(f"--stride must be between 1 and the model's context ({context}), got {stride}")
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens, 1), stride):
        end = min(begin + context, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))  # a window's first token has no predecessor in it
        prev_end = end
        if end == n_tokens:
            break
    return out


def read_text(path: Path, text_field: str = "text", text_column: str | int = "text") -> str:
    """The text of one input: a .txt file as it is (CRLF as "\\n"), else its documents joined
    by a blank line."""
    fmt = input_format(path)
    if fmt == "txt":
        return "".join(text for text, _ in iter_chunks(path))
    return "\n\n".join(doc.text for doc in iter_documents(path, text_field=text_field, text_column=text_column))


def encode_text(tokenizer, text: str) -> np.ndarray:
    """The token ids of `text` without special tokens, encoded in ~1 MiB pieces cut where the
    tokenizer splits anyway (see the module docstring)."""
    ids: list[np.ndarray] = []
    start = 0
    while start < len(text):
        stop = len(text)
        if stop - start > _PIECE_CHARS:
            window = text[start:start + _PIECE_CHARS]
            cuts = [m.end() for m in _SAFE_CUT.finditer(window)]
            beyond = None if cuts else _SAFE_CUT.search(text, start + _PIECE_CHARS)
            stop = start + cuts[-1] if cuts else (beyond.end() if beyond else len(text))
        ids.append(np.asarray(tokenizer.encode(text[start:stop], add_special_tokens=False).ids, dtype=np.int64))
        start = stop
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def check_causal(loaded: LoadedModel) -> int:
    """The context of a causal LM checkpoint; ValueError for a BERT or a classifier."""
    kind = loaded.architecture.get("model_type")
    if kind == "bert":
        raise ValueError(f"{loaded.path}: a BERT checkpoint is a masked language model, not a causal one; "
                         "perplexity over raw text needs a GPT-class model (evaluate a BERT on a prepared "
                         "mlm folder with --data instead)")
    if kind == "classifier":
        raise ValueError(f"{loaded.path}: a classifier has no language-model head; evaluate it with --data "
                         "on a prepared classify folder, or the checkpoint it was fine-tuned from with --text")
    context = getattr(getattr(loaded.model, "config", None), "context", None) or loaded.architecture.get("context")
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"{loaded.path}: config.json has no usable context ({context!r})")
    return context


@torch.inference_mode()
def score_ids(model: torch.nn.Module, ids: np.ndarray, context: int, stride: int, device: torch.device,
              vocab_size: int, batch_size: int = 8) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) of the ids under `model`, windows as `windows`."""
    spans = windows(len(ids), context, stride)
    per_pass = max(1, min(batch_size, _LOGITS_BUDGET // (context * max(vocab_size, 1))))
    tokens = torch.as_tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    i = 0
    while i < len(spans):
        length = spans[i][1] - spans[i][0]  # a batch holds windows of one length (all but the last)
        group = [spans[i]]
        while len(group) < per_pass and i + len(group) < len(spans) and \
                spans[i + len(group)][1] - spans[i + len(group)][0] == length:
            group.append(spans[i + len(group)])
        i += len(group)
        if length < 2:
            continue
        x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)  # (B, T)
        out = model(x)
        logits = (out[0] if isinstance(out, tuple) else out)[:, :-1].float()  # (B, T-1, V): predicts x[:, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, T-1)
        for row, (begin, end, first) in enumerate(group):
            if first < end:
                total -= logp[row, first - begin - 1:].double().sum().item()
                count += end - first
    return total, count


def text_perplexity(loaded: LoadedModel, inputs: list[Path | str], *, stride: int | None = None,
                    batch_size: int = 8, text_field: str = "text", text_column: str | int = "text"
                    ) -> tuple[list[TextScore], TextScore, int, int]:
    """(a score per input file, their sum, context, stride) of the texts under a causal LM
    checkpoint; `stride` None: half the context (the guide's 512 for GPT-2's 1024)."""
    context = check_causal(loaded)
    stride = context // 2 if stride is None else stride
    windows(context, context, stride)  # a bad stride is named before any text is read
    vocab = loaded.architecture.get("vocab_size", 0)
    scores = []
    for path in check_inputs(inputs):
        text = read_text(path, text_field, text_column)
        bos, eos = added_ids(loaded.tokenizer, tokenizer_settings(loaded.path))
        ids = np.concatenate([[bos] if bos is not None else [], encode_text(loaded.tokenizer, text),
                              [eos] if eos is not None else []]).astype(np.int64)
        if len(ids) < 2:
            raise ValueError(f"{path}: {len(ids)} token(s) of text; perplexity needs at least two")
        nll, scored = score_ids(loaded.model, ids, context, stride, loaded.device, vocab, batch_size)
        scores.append(TextScore(str(path), len(ids), scored, nll, len(text.encode("utf-8"))))
    total = TextScore("total", sum(s.tokens for s in scores), sum(s.scored for s in scores),
                      sum(s.nll for s in scores), sum(s.bytes for s in scores))
    return scores, total, context, stride


def perplexity_report(loaded: LoadedModel, inputs: list[Path | str], *, stride: int | None = None,
                      batch_size: int = 8, text_field: str = "text", text_column: str | int = "text") -> dict:
    """`text_perplexity` as one dict: the total's numbers, the checkpoint, context and stride, and
    under "texts" one dict per file (what `lmforge eval --text --json` prints)."""
    scores, total, context, stride = text_perplexity(loaded, inputs, stride=stride, batch_size=batch_size,
                                                     text_field=text_field, text_column=text_column)
    result = {"checkpoint": str(loaded.path), "context": context, "stride": stride, **total.as_dict(),
              "texts": [s.as_dict() for s in scores]}
    del result["text"]
    return result
