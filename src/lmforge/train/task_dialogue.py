"""The dialogue task: multi-turn chit-chat fine-tuning of a GPT (GPT2-chitchat, done properly).

Samples are whole dialogues `[CLS] u1 [SEP] u2 [SEP] ...` from a folder written by
`lmforge prepare --task dialogue` (format: `lmforge.data.prepare_dialogue`). A dialogue
longer than the model context keeps its most recent whole turns. Dialogues rendered with a
chat template (`lmforge.data.dialogue_samples`) have no [SEP] to cut at: one longer than the
context keeps its first tokens (prepare's --max-len drops whole turns instead; role 1 marks
the assistant's turns there). Batches are right-padded as GPT2-chitchat does (inputs with the pad id, labels with -100). `train.loss_on`:

- "responses" (default): labels are -100 on [CLS] and on the user's turns (and their [SEP]),
  so only the replies, and the [SEP] that ends each reply, are learned;
- "all": every real token is learned (GPT2-chitchat).

Loss and token accuracy follow GPT2-chitchat's `calculate_acc`: logits at t predict label
t+1, labels equal to -100 are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from lmforge.data.dialogue_format import RESPONSE, build_sample, split_turns
from lmforge.data.dialogue_samples import TEMPLATE_FORMAT
from lmforge.data.store import TokenStore, read_roles
from lmforge.base.metrics import IGNORE_INDEX
from lmforge.train.task_lm import LMTask, next_token_stats
from lmforge.train.tasks import StepStats


class DialogueDataset(Dataset):
    """Item i: {"input_ids", "labels"} of dialogue i, trimmed to `max_len` by whole turns."""

    def __init__(self, store: TokenStore, max_len: int, loss_on: str = "responses") -> None:
        if loss_on not in ("responses", "all"):
            raise ValueError(f"loss_on must be 'responses' or 'all', got {loss_on!r}")
        dialogue = store.meta.get("dialogue") or {}
        if "sep_id" not in dialogue:
            raise ValueError(f"{store.data_dir}/meta.json: no dialogue section; prepare the data "
                             f"with `lmforge prepare --task dialogue`")
        self.store = store
        self.max_len = max_len
        self.loss_on = loss_on
        self.templated = dialogue.get("format") == TEMPLATE_FORMAT  # rendered with a chat template: no [SEP]
        self.cls, self.sep = (None, None) if self.templated else (int(dialogue["cls_id"]), int(dialogue["sep_id"]))
        self.roles = read_roles(store.data_dir, store.split, len(store.tokens))

    def __len__(self) -> int:
        return len(self.store)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, roles) of dialogue i, at most max_len tokens."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"dialogue {i} out of range ({n} dialogues)")
        i %= n
        a, b = int(self.store.offsets[i]), int(self.store.offsets[i + 1])
        ids = np.asarray(self.store.tokens[a:b], dtype=np.int64)
        roles = np.asarray(self.roles[a:b], dtype=np.int64)
        if len(ids) > self.max_len and self.templated:
            ids, roles = ids[:self.max_len], roles[:self.max_len]  # prepare --max-len trims by whole turns
        elif len(ids) > self.max_len:
            turns, turn_roles = split_turns(ids, roles, self.sep)
            trimmed, trimmed_roles = build_sample(turns, turn_roles, self.cls, self.sep, self.max_len)
            ids, roles = np.asarray(trimmed, np.int64), np.asarray(trimmed_roles, np.int64)
        return ids, roles

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, roles = self.sample(i)
        input_ids = torch.from_numpy(ids)
        labels = input_ids.clone()
        if self.loss_on == "responses":
            labels[torch.from_numpy(roles) != RESPONSE] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


class DialogueTask(LMTask):
    """Next-token prediction on dialogues; the loss on replies only, or on everything.

    An LM task (padding collate, target counts, loss and accuracy means) over dialogue samples.
    """

    name = "dialogue"

    def dataset(self, split: str) -> DialogueDataset:
        """The split's dialogues; with loss_on=responses, a split of dialogues without a reply token
        is an error naming the counts (an older folder, prepare refuses it now: the loss would be 0)."""
        store = TokenStore(Path(self.cfg.data.path), split)
        dataset = DialogueDataset(store, self.context, self.cfg.train.loss_on)
        if dataset.loss_on == "responses" and len(dataset) and not np.count_nonzero(dataset.roles):
            raise ValueError(f"{store.data_dir}: the {split} split has {len(dataset):,} dialogues "
                             f"({len(store.tokens):,} tokens) and 0 reply tokens, so train.loss_on=responses has "
                             "nothing to learn there (its loss would be 0); learn every turn with "
                             "train.loss_on=all, or prepare the data again from dialogues with replies")
        return dataset

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def loss_and_metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepStats:
        # Right padding under a causal mask: real tokens never see the pads after them and the
        # pads' labels are -100, so the fast causal kernel (no mask) gives the same loss.
        return next_token_stats(model, batch["input_ids"], batch["labels"])

    def samples(self, model: nn.Module, runtime) -> list[dict]:
        """One reply to each configured prompt (taken as the user's first turn), for the log and report."""
        from lmforge.inference.chat_format import chat_format_for
        from lmforge.inference.chat_session import ChatSession
        from lmforge.inference.generate import SamplingConfig
        from lmforge.base.tokenizer import load_tokenizer

        train = self.cfg.train
        prompts = [p for p in train.sample_prompts if p.strip()]
        if train.sample_tokens == 0 or not prompts:
            return []
        tokenizer = load_tokenizer(Path(self.cfg.data.path) / "tokenizer.json")
        fmt = chat_format_for(tokenizer, Path(self.cfg.data.path))  # the data's chat template, if any
        sampling = SamplingConfig(max_new_tokens=min(train.sample_tokens, 64), temperature=0.7,
                                  top_k=8, repetition_penalty=1.2)
        generator = torch.Generator(device=runtime.device).manual_seed(train.seed)
        results = []
        for prompt in prompts:
            session = ChatSession(model, tokenizer, sampling, generator=generator, chat_format=fmt)
            results.append({"prompt": prompt + "\n", "text": "".join(session.reply(prompt))})
        return results
