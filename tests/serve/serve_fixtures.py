"""Tiny checkpoints for the server tests (a chat GPT on WordPiece, a BERT, a classifier) and a
server over all three on a free localhost port, shut down after the tests."""

from __future__ import annotations

import pytest
import torch

from lmforge.base.tokenizer import load_tokenizer, train_tokenizer
from lmforge.checkpoint import save_checkpoint
from lmforge.commands.quickstart import bundled_corpus
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.heads import classifier_architecture
from lmforge.models.registry import model_from_architecture
from tests_serve_helpers import peaked

CONTEXT = 64


@pytest.fixture(scope="session")
def serve_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus.txt"
    corpus.write_text(bundled_corpus().read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    wp = train_tokenizer([corpus], kind="wordpiece", vocab_size=400, out_dir=root / "wp", lowercase=True,
                         show_progress=False)
    vocab = load_tokenizer(wp).get_vocab_size()
    gpt = peaked(context=CONTEXT, vocab=vocab)
    save_checkpoint(root / "runs" / "bot" / "checkpoints" / "best", model_state=gpt.state_dict(),
                    model_config={"model_type": "gpt", **gpt.config.to_dict()}, tokenizer_file=wp)
    torch.manual_seed(1)
    bert = BertConfig(vocab_size=vocab, context=CONTEXT, n_layer=1, n_head=2, n_embd=16, intermediate_size=32)
    save_checkpoint(root / "bert", model_state=Bert(bert).state_dict(),
                    model_config={"model_type": "bert", **bert.to_dict()}, tokenizer_file=wp)
    arch = classifier_architecture({"model_type": "gpt", **gpt.config.to_dict()}, ["ham", "spam"])
    save_checkpoint(root / "clf", model_state=model_from_architecture(arch).state_dict(), model_config=arch,
                    tokenizer_file=wp)
    return {"root": root, "gpt_run": root / "runs" / "bot", "bert": root / "bert", "clf": root / "clf"}


@pytest.fixture(scope="session")
def server(serve_checkpoints):
    """(url, state): a server over the chat GPT ("bot"), the BERT ("bert") and the classifier ("clf")."""
    from lmforge.serve.served import load_served
    from lmforge.serve.server import ServerThread
    from lmforge.serve.state import ServerState

    c = serve_checkpoints
    models = [load_served(str(c["gpt_run"]), "cpu", max_batch=16), load_served(f"bert={c['bert']}", "cpu"),
              load_served(f"clf={c['clf']}", "cpu")]
    state = ServerState(models={m.name: m for m in models}, max_tokens=48, max_body_bytes=64 * 1024)
    with ServerThread(state) as url:
        yield url, state
