"""A checkpoint as the server offers it: its name, what it can do, and its prompts.

Owns `ServedModel` and `load_served`. A GPT generates (chat and completions, on a batching
`Scheduler`) and embeds; a BERT embeds; a classifier classifies. Chat messages become the
model's own format: `[CLS] u1 [SEP] a1 [SEP] ... [SEP]` for models trained here (the
GPT2-chitchat format of `lmforge.data.dialogue_format`, replies ending at [SEP]).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from lmforge.data.dialogue_format import ROLE_NAMES, build_sample, dialogue_specials
from lmforge.inference.loaded import LoadedModel, load_for_inference
from lmforge.inference.scheduler import Scheduler
from lmforge.models.gpt import GPT
from lmforge.models.heads import label_names_of

KINDS = {"gpt": ("chat", "completions", "embeddings"), "bert": ("embeddings",), "classifier": ("classify",)}


@dataclass(eq=False)
class ServedModel:
    """One checkpoint behind the API."""

    name: str
    loaded: LoadedModel
    labels: list[str] | None = None
    scheduler: Scheduler | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held by embedding and classification batches, one at a time per model."""
    chat_tokenizer: Tokenizer | None = None
    """The tokenizer with special tokens read as text: a typed "[SEP]" is not a turn boundary."""

    @property
    def kind(self) -> str:
        return self.loaded.architecture.get("model_type", "")

    @property
    def abilities(self) -> tuple[str, ...]:
        return KINDS.get(self.kind, ())

    @property
    def context(self) -> int:
        return self.loaded.model.config.context

    def chat_ids(self, messages: list[tuple[str, str]], max_len: int | None) -> list[int]:
        """The prompt of a reply to `messages` ((role, text) pairs), at most `max_len` tokens (older
        whole turns dropped first)."""
        cls, sep = dialogue_specials(self.loaded.specials, str(self.loaded.path))
        tok = self.chat_tokenizer
        turns = [tok.encode(text, add_special_tokens=False).ids for _, text in messages]
        roles = [ROLE_NAMES[role] for role, _ in messages]
        return build_sample(turns, roles, cls, sep, max_len)[0]

    def chat_stop_ids(self) -> tuple[int, ...]:
        """The ids that end a reply: [SEP] (or end-of-text) in the GPT2-chitchat format."""
        return (dialogue_specials(self.loaded.specials, str(self.loaded.path))[1],)

    def completion_ids(self, prompt: str | list[int]) -> tuple[list[int], tuple[int, ...]]:
        """A prompt's ids (an empty one starts a new document) and the ids that end it (end-of-text)."""
        eos = self.loaded.specials.eos
        ids = list(prompt) if isinstance(prompt, list) else self.loaded.tokenizer.encode(prompt).ids
        if not ids and eos is None:
            raise ValueError("the prompt has no tokens and this tokenizer has no end-of-text token to start from")
        return (ids or [eos]), (() if eos is None else (eos,))

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


def split_spec(spec: str) -> tuple[str, Path]:
    """"NAME=PATH" or "PATH" -> (name, path); the name defaults to the folder's name (a run folder's
    name for a checkpoint inside `RUN/checkpoints/`)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    path = Path(spec)
    resolved = path.resolve()
    if resolved.parent.name == "checkpoints":
        return f"{resolved.parent.parent.name}-{resolved.name}", path
    return resolved.name, path


def load_served(spec: str, device: str = "auto", max_batch: int = 16) -> ServedModel:
    """Load one checkpoint (or run folder) for serving; GPTs get a scheduler of `max_batch` rows."""
    name, path = split_spec(spec)
    loaded = load_for_inference(path, device)
    kind = loaded.architecture.get("model_type")
    if kind == "classifier":
        loaded.tokenizer.no_truncation()  # as load_classifier: texts are cut to the context by hand
        loaded.tokenizer.no_padding()
        return ServedModel(name=name, loaded=loaded, labels=label_names_of(loaded.architecture))
    if kind == "gpt" and isinstance(loaded.model, GPT):
        chat_tokenizer = Tokenizer.from_str(loaded.tokenizer.to_str())
        chat_tokenizer.encode_special_tokens = True
        return ServedModel(name=name, loaded=loaded, scheduler=Scheduler(loaded.model, max_batch),
                           chat_tokenizer=chat_tokenizer)
    if kind == "bert":
        return ServedModel(name=name, loaded=loaded)
    raise ValueError(f"{loaded.path}: a {kind!r} checkpoint; lmforge serve takes GPT (chat, completions, "
                     "embeddings), BERT (embeddings) and classifier checkpoints")
