"""A checkpoint as the server offers it: its name, what it can do, and its prompts.

Owns `ServedModel` and `load_served`. A GPT or Llama generates (chat and
completions, on a batching `Scheduler`) and embeds; a BERT embeds; a classifier classifies.
Chat messages become the model's own format (`lmforge.inference.chat_format`): the
checkpoint's chat template when it has one (imported Llama-class models), else
GPT2-chitchat's `[CLS] u1 [SEP] a1 [SEP] ... [SEP]` for models trained here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from lmforge.inference.chat_format import ChatFormat, chat_format_for
from lmforge.inference.loaded import LoadedModel, load_for_inference
from lmforge.inference.scheduler import Scheduler
from lmforge.models.decoding import CAUSAL_LMS
from lmforge.models.heads import is_regression, label_names_of

GENERATES = ("chat", "completions", "embeddings")
KINDS = {"gpt": GENERATES, "llama": GENERATES, "bert": ("embeddings",), "classifier": ("classify",)}


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
    chat: ChatFormat | None = None
    """How messages become a prompt, and which ids end a reply."""

    @property
    def kind(self) -> str:
        return self.loaded.architecture.get("model_type", "")

    @property
    def abilities(self) -> tuple[str, ...]:
        return KINDS.get(self.kind, ())

    @property
    def context(self) -> int:
        return self.loaded.model.config.context

    def chat_ids(self, messages: list[dict], max_len: int | None) -> list[int]:
        """The prompt of a reply to `messages`, at most `max_len` tokens (older exchanges dropped first)."""
        return self.chat.prompt_ids(messages, max_len)

    def chat_stop_ids(self) -> tuple[int, ...]:
        """The ids that end a reply: the template's end of turn, or [SEP] in the chitchat format."""
        return self.chat.stop_ids

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
    if is_regression(loaded.architecture):
        raise ValueError(f"{loaded.path}: a regression head (one number per text); serving one is not supported "
                         "by this version: use `lmforge classify` or lmforge.load(...).classify")
    if kind == "classifier":
        loaded.tokenizer.no_truncation()  # as load_classifier: texts are cut to the context by hand
        loaded.tokenizer.no_padding()
        return ServedModel(name=name, loaded=loaded, labels=label_names_of(loaded.architecture))
    if kind in ("gpt", "llama") and isinstance(loaded.model, CAUSAL_LMS):
        # a tokenizer of its own: the chat format switches how special-token text is read
        chat = chat_format_for(Tokenizer.from_str(loaded.tokenizer.to_str()), loaded.path)
        return ServedModel(name=name, loaded=loaded, scheduler=Scheduler(loaded.model, max_batch), chat=chat)
    if kind == "bert":
        return ServedModel(name=name, loaded=loaded)
    raise ValueError(f"{loaded.path}: a {kind!r} checkpoint; lmforge serve takes GPT and Llama (chat, "
                     "completions, embeddings), BERT (embeddings) and classifier checkpoints")
