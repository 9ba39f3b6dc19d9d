"""BERT pretraining data: sentence pairs for next-sentence prediction, and MLM masking.

Owns `SentencePairDataset` and `mask_tokens` / `MLMCollator`.

The prepared store (task "mlm", see `lmforge.data.prepare_mlm`) holds one sample per
sentence, with `{split}.labels` giving each sentence's paragraph number. Item i of the
dataset is the i-th sentence that has a successor in its paragraph (A); B is that successor
(NSP label 0, "is next") or, with probability 1/2, a random sentence of another paragraph
(label 1, "random"), as transformers' `next_sentence_label`. The draw depends only on
(seed, epoch, i): pairs change every epoch (`set_epoch`), and a resumed run sees the same
pairs. The pair `[CLS] A [SEP] B [SEP]` (segment ids 0 for [CLS] A [SEP], 1 for B [SEP]) is
cut to `max_len` by trimming the end of the longer side.

Masking is drawn per batch in the collate function (dynamic masking, as RoBERTa and
transformers' DataCollatorForLanguageModeling): 15% of the real, non-special tokens are
chosen; of those 80% become [MASK], 10% a random token, 10% stay; labels are the original
ids there and -100 elsewhere. A dataset built with `premask=True` (validation) masks each
item instead, from (seed, i), so every evaluation sees the same masks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lmforge.data.collate import IGNORE_INDEX, pad_collate
from lmforge.data.store import TokenStore

MASK_PROB, MASK_TOKEN_PROB, RANDOM_TOKEN_PROB = 0.15, 0.8, 0.1
_RANDOM_TRIES = 16  # draws for a sentence of another paragraph before giving up on "another"


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths that fit `budget` tokens, trimming the longer side first (ties trim B)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    keep_a = min(len_a, max(budget - len_b, (budget + 1) // 2))
    return keep_a, min(len_b, budget - keep_a)


class SentencePairDataset(Dataset):
    """`[CLS] A [SEP] B [SEP]` pairs over one split of an "mlm" token store (see module docstring)."""

    def __init__(self, store: TokenStore, max_len: int, cls_id: int, sep_id: int, *, seed: int = 0,
                 premask: bool = False, mask_id: int | None = None, vocab_size: int | None = None) -> None:
        if max_len < 5:
            raise ValueError(f"max_len={max_len}: a sentence pair needs at least 5 positions")
        if store.labels is None:
            raise ValueError(f"{store.data_dir}: split {store.split!r} has no {store.split}.labels "
                             "(paragraph numbers); prepare it with `lmforge prepare --task mlm`")
        if premask and (mask_id is None or vocab_size is None):
            raise ValueError("premask=True needs mask_id and vocab_size")
        self.store, self.max_len, self.cls_id, self.sep_id = store, max_len, cls_id, sep_id
        self.seed, self.premask, self.mask_id, self.vocab_size = seed, premask, mask_id, vocab_size
        self.specials = [cls_id, sep_id]
        self.epoch = 0
        paragraphs = np.asarray(store.labels)
        self.paragraphs = paragraphs
        # first sentences of pairs: followed by a sentence of the same paragraph
        self.firsts = np.flatnonzero(paragraphs[:-1] == paragraphs[1:]) if len(paragraphs) > 1 else np.zeros(0, int)

    def set_epoch(self, epoch: int) -> None:
        """Pairs are drawn anew for every epoch (deterministically from seed and epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.firsts)

    def _random_sentence(self, rng: np.random.Generator, a: int) -> int:
        n = len(self.paragraphs)
        for _ in range(_RANDOM_TRIES):
            j = int(rng.integers(n))
            if self.paragraphs[j] != self.paragraphs[a]:
                return j
        # (almost) a single paragraph: any sentence other than A's true successor
        j = int(rng.integers(n - 1))
        return j if j <= a else j + 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range ({n} pairs)")
        i %= n
        rng = np.random.default_rng([self.seed, self.epoch if not self.premask else 0, i])
        a = int(self.firsts[i])
        is_random = bool(rng.random() < 0.5)
        b = self._random_sentence(rng, a) if is_random else a + 1
        ids_a, ids_b = self.store[a], self.store[b]
        la, lb = truncate_pair(len(ids_a), len(ids_b), self.max_len - 3)
        ids = np.concatenate([[self.cls_id], ids_a[:la], [self.sep_id], ids_b[:lb], [self.sep_id]]).astype(np.int64)
        types = np.zeros(len(ids), dtype=np.int64)
        types[la + 2:] = 1
        item = {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
                "next_sentence_label": torch.tensor(int(is_random))}
        if self.premask:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            masked, labels = mask_tokens(item["input_ids"][None], self.specials, self.mask_id,
                                         self.vocab_size, gen)
            item["input_ids"], item["labels"] = masked[0], labels[0]
        return item


def mask_tokens(input_ids: torch.Tensor, special_ids: list[int], mask_id: int, vocab_size: int,
                generator: torch.Generator, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) ids -> (masked ids, labels); padding and `special_ids` never chosen."""
    ids = input_ids.clone()
    candidates = ~torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))  # (B, T)
    if attention_mask is not None:
        candidates &= attention_mask.bool()
    u = torch.rand(ids.shape, generator=generator)  # (B, T): chosen?
    v = torch.rand(ids.shape, generator=generator)  # (B, T): which replacement
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)  # (B, T)
    chosen = candidates & (u < MASK_PROB)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    ids[chosen & (v < MASK_TOKEN_PROB)] = mask_id
    use_random = chosen & (v >= MASK_TOKEN_PROB) & (v < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB)
    ids[use_random] = random_ids[use_random]
    return ids, labels


class MLMCollator:
    """Pads a list of pairs and masks them (unless the items came masked, see `premask`).

    The mask generator is seeded from one draw of torch's global RNG per batch: the loop
    restores that RNG on resume, so a resumed run masks exactly as an uninterrupted one.
    """

    def __init__(self, pad_id: int, special_ids: list[int], mask_id: int, vocab_size: int) -> None:
        self.pad_id, self.special_ids, self.mask_id, self.vocab_size = pad_id, special_ids, mask_id, vocab_size

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        premasked = "labels" in samples[0]
        batch = pad_collate(samples, self.pad_id)
        if not premasked:
            seed = int(torch.randint(2**62, (1,)))
            generator = torch.Generator().manual_seed(seed)
            batch["input_ids"], batch["labels"] = mask_tokens(
                batch["input_ids"], self.special_ids + [self.pad_id], self.mask_id, self.vocab_size,
                generator, batch["attention_mask"])
        return batch
