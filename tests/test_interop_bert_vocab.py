"""GPT2-chitchat's layout: a GPT-2 model folder whose tokenizer is a BERT vocab.txt
(BertTokenizerFast). import-hf keeps that WordPiece tokenizer (ids equal to transformers'),
`prepare --tokenizer vocab.txt` writes `[CLS] u1 [SEP] u2 [SEP]` samples with the same ids,
and the imported model chats in that format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lmforge.base.tokenizer import load_tokenizer, special_ids
from lmforge.cli import main
from lmforge.commands.chat import run_chat
from lmforge.commands.interop import import_hf
from lmforge.data.store import TokenStore, read_roles
from lmforge.inference.generate import SamplingConfig
from lmforge.inference.loaded import load_for_inference
from lmforge.train.run import check_tokenizer_match

transformers = pytest.importorskip("transformers")

WORDS = list("你好吗我很天气怎么样今明喜欢吃苹果香蕉什呢的了是不") + ["hello", "world", "##s", "!", "，", "。", "？"]
DIALOGUES = [["你好", "你好！今天天气怎么样？"], ["你喜欢吃什么", "我喜欢吃苹果", "我也是"], ["Hellos world!", "hello"]]


@pytest.fixture(scope="module")
def chitchat_folder(tmp_path_factory) -> Path:
    """GPT2LMHeadModel.save_pretrained plus the vocab.txt beside it, nothing else."""
    folder = tmp_path_factory.mktemp("gpt2_chitchat") / "model"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=2, eos_token_id=3)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return folder


def test_import_keeps_the_bert_vocabulary(chitchat_folder: Path, tmp_path: Path):
    out = import_hf(chitchat_folder, tmp_path / "ckpt")
    tok = load_tokenizer(out)
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(chitchat_folder))
    for text in ["你好吗？今天天气怎么样", "Hellos WORLD! 我很好", "unknown 字"]:
        assert tok.encode(text).ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    ids = special_ids(tok)
    assert (ids.cls, ids.sep, ids.pad, ids.eos) == (2, 3, 0, 3)  # [SEP] ends a reply
    loaded = load_for_inference(out, "cpu")
    model = transformers.GPT2LMHeadModel.from_pretrained(str(chitchat_folder)).eval()
    x = torch.tensor([[2] + hf_tok("你好吗", add_special_tokens=False)["input_ids"] + [3]])
    with torch.no_grad():
        expected = model(x).logits
        got = loaded.model(x)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, expected, atol=1e-4, rtol=1e-4)


def test_prepare_with_vocab_txt_and_chat(chitchat_folder: Path, tmp_path: Path):
    corpus = tmp_path / "chat.txt"
    corpus.write_text("\n\n".join("\n".join(d) for d in DIALOGUES * 4) + "\n", encoding="utf-8")
    assert main(["prepare", "--task", "dialogue", "--input", str(corpus), "--tokenizer",
                 str(chitchat_folder / "vocab.txt"), "--out", str(tmp_path / "data"), "--val-fraction", "0.2"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text(encoding="utf-8"))
    assert meta["dialogue"]["cls_id"] == 2 and meta["dialogue"]["sep_id"] == 3
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(chitchat_folder))
    encoded = {tuple(hf_tok(t, add_special_tokens=False)["input_ids"]) for d in DIALOGUES for t in d}
    store = TokenStore(tmp_path / "data", "train")
    roles = read_roles(tmp_path / "data", "train", len(store.tokens))
    first = [int(t) for t in store.tokens[: int(store.offsets[1])]]
    assert first[0] == 2 and first[-1] == 3
    turns, current = [], []
    for t in first[1:]:
        if t == 3:
            turns.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert turns and all(turn in encoded for turn in turns)
    assert list(roles[: len(first)]).count(1) > 0  # the replies are learned
    checkpoint = import_hf(chitchat_folder, tmp_path / "ckpt")
    check_tokenizer_match(checkpoint / "tokenizer.json", tmp_path / "data", "model.init_from")  # same vocabulary
    out = io.StringIO()
    assert run_chat(checkpoint, SamplingConfig(max_new_tokens=4, temperature=0), stdin=io.StringIO("你好\n天气\n"),
                    stdout=out, device="cpu") == 0
    assert len(out.getvalue().splitlines()) == 2


def test_a_vocab_without_unk_is_refused(tmp_path: Path):
    (tmp_path / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt: no \[UNK\] token"):
        load_tokenizer(tmp_path / "vocab.txt")
