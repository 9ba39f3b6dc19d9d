"""BERT pretraining data: sentence splitting, prepare --task mlm, sentence pairs, masking."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.mlm import MLMCollator, SentencePairDataset, mask_tokens, truncate_pair
from lmforge.data.prepare import prepare
from lmforge.data.prepare_mlm import split_sentences
from lmforge.data.store import TokenStore
from lmforge.base.tokenizer import train_tokenizer


def topic_corpus(path: Path, paragraphs: int = 60, seed: int = 0) -> Path:
    """Paragraphs of 3-6 sentences, each paragraph drawing its words from one of 6 topics."""
    rng = random.Random(seed)
    topics = [[f"{name}{i}" for i in range(10)] for name in ("apple", "river", "stone", "cloud", "metal", "glass")]
    lines = []
    for _ in range(paragraphs):
        words = rng.choice(topics)
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))).capitalize() + "."
                     for _ in range(rng.randint(3, 6))]
        lines.append(" ".join(sentences))
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    corpus = topic_corpus(root / "corpus.txt")
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=200, out_dir=root / "tok",
                          lowercase=True, show_progress=False)
    prepare("mlm", [corpus], tok, root / "data", val_fraction=0.1, seed=3, show_progress=False)
    return root / "data"


def test_split_sentences_english_and_chinese():
    assert split_sentences("It rained.  Did it?\nYes! 3 @.@ 5 km \"Fine.\" End") == \
        ["It rained.", "Did it?", "Yes!", "3 @.@ 5 km \"Fine.\"", "End"]
    assert split_sentences("今天下雨了。你去吗？去！好") == ["今天下雨了。", "你去吗？", "去！", "好"]
    assert split_sentences("Like H. americanus, Mr. Smith said. Go") == ["Like H. americanus, Mr. Smith said.", "Go"]
    assert split_sentences("   ") == []


def test_prepare_mlm_stores_sentences_with_paragraph_numbers(mlm_data: Path):
    meta = json.loads((mlm_data / "meta.json").read_text())
    assert meta["task"] == "mlm" and meta["split_by"] == "paragraph"
    store = TokenStore(mlm_data, "train")
    assert len(store) == meta["splits"]["train"]["samples"] > 100
    labels = np.asarray(store.labels)
    assert labels[0] == 0 and labels[-1] == meta["paragraphs"]["train"] - 1
    assert np.all(np.diff(labels) >= 0) and np.all(np.diff(labels) <= 1)  # in order, one by one
    specials = set(meta["special_ids"].values())
    assert not specials & set(np.asarray(store.tokens).tolist())  # no [CLS]/[SEP] stored


def test_prepare_mlm_refuses_a_tokenizer_without_bert_specials(tmp_path: Path):
    corpus = topic_corpus(tmp_path / "c.txt", paragraphs=5)
    tok = train_tokenizer([corpus], kind="bpe", vocab_size=300, out_dir=tmp_path / "tok", show_progress=False)
    with pytest.raises(ValueError, match=r"\[CLS\].*--kind wordpiece"):
        prepare("mlm", [corpus], tok, tmp_path / "data", show_progress=False)


@pytest.mark.parametrize("la,lb,budget", [(10, 10, 15), (20, 3, 15), (3, 20, 15), (10, 11, 15), (4, 4, 20),
                                          (0, 30, 7), (100, 100, 1)])
def test_truncate_pair_trims_the_longer_side(la: int, lb: int, budget: int):
    a, b = truncate_pair(la, lb, budget)
    ra, rb = la, lb  # reference: trim one token at a time from the longer side
    while ra + rb > budget:
        if ra > rb:
            ra -= 1
        else:
            rb -= 1
    assert (a, b) == (ra, rb)


def _dataset(mlm_data: Path, max_len: int = 16, **kw) -> SentencePairDataset:
    meta = json.loads((mlm_data / "meta.json").read_text())
    ids = meta["special_ids"]
    return SentencePairDataset(TokenStore(mlm_data, "train"), max_len, ids["cls"], ids["sep"], seed=5, **kw)


def test_pairs_fit_max_len_and_half_are_random(mlm_data: Path):
    ds = _dataset(mlm_data, max_len=16)
    store, paragraphs = ds.store, ds.paragraphs
    randoms = []
    for i in range(len(ds)):
        item = ds[i]
        ids, types = item["input_ids"].tolist(), item["token_type_ids"].tolist()
        assert len(ids) <= 16 and len(ids) == len(types)
        assert ids[0] == ds.cls_id and ids[-1] == ds.sep_id and ids.count(ds.sep_id) == 2
        first_b = ids.index(ds.sep_id) + 1
        assert types == [0] * first_b + [1] * (len(ids) - first_b)
        a = int(ds.firsts[i])
        assert ids[1:first_b - 1] == store[a][:first_b - 2].tolist()
        if item["next_sentence_label"] == 0:
            assert ids[first_b:-1] == store[a + 1][:len(ids) - first_b - 1].tolist()
        randoms.append(int(item["next_sentence_label"]))
    assert abs(np.mean(randoms) - 0.5) < 0.1, np.mean(randoms)
    assert len(ds) == int(np.sum(paragraphs[:-1] == paragraphs[1:]))


def test_pairs_are_deterministic_per_epoch_and_change_between_epochs(mlm_data: Path):
    ds, again = _dataset(mlm_data), _dataset(mlm_data)
    draw = lambda d: [(d[i]["input_ids"].tolist(), int(d[i]["next_sentence_label"])) for i in range(len(d))]
    first = draw(ds)
    assert draw(again) == first
    ds.set_epoch(1)
    assert draw(ds) != first
    ds.set_epoch(0)
    assert draw(ds) == first


def test_masking_proportions_and_specials_never_masked():
    vocab, mask_id, specials, pad = 1000, 4, [2, 3], 0
    collate = MLMCollator(pad, specials, mask_id, vocab)
    torch.manual_seed(0)
    chosen = candidates = masked = unchanged = special_hits = 0
    for _ in range(50):
        samples = []
        for n in torch.randint(5, 60, (16,)).tolist():
            body = torch.randint(10, vocab, (n,))
            samples.append({"input_ids": torch.cat([torch.tensor([2]), body, torch.tensor([3])]),
                            "token_type_ids": torch.zeros(n + 2, dtype=torch.long),
                            "next_sentence_label": torch.tensor(0)})
        original = torch.nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True)
        batch = collate(samples)
        picked = batch["labels"] != -100
        real = batch["attention_mask"].bool() & ~torch.isin(original, torch.tensor(specials))
        special_hits += int((picked & ~real).sum())
        assert torch.equal(batch["labels"][picked], original[picked])
        chosen += int(picked.sum())
        candidates += int(real.sum())
        masked += int((batch["input_ids"][picked] == mask_id).sum())
        unchanged += int((batch["input_ids"][picked] == original[picked]).sum())
    assert special_hits == 0
    assert abs(chosen / candidates - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(unchanged / chosen - 0.1) < 0.02  # (+0.1/vocab: a random token may equal the original)
    assert abs((chosen - masked - unchanged) / chosen - 0.1) < 0.02


def test_masking_is_reproducible_from_the_global_rng_and_premasked_items_stay(mlm_data: Path):
    meta = json.loads((mlm_data / "meta.json").read_text())
    ids = meta["special_ids"]
    collate = MLMCollator(ids["pad"], [ids["cls"], ids["sep"]], ids["mask"], meta["vocab_size"])
    ds = _dataset(mlm_data, max_len=32)
    samples = [ds[i] for i in range(8)]
    torch.manual_seed(11)
    one = collate(samples)
    torch.manual_seed(11)
    two = collate(samples)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(collate(samples)["labels"], one["labels"])  # a new draw per batch
    val = _dataset(mlm_data, max_len=32, premask=True, mask_id=ids["mask"], vocab_size=meta["vocab_size"])
    first = collate([val[i] for i in range(8)])
    again = collate([val[i] for i in range(8)])
    assert torch.equal(first["input_ids"], again["input_ids"]) and bool((first["labels"] != -100).any())


def test_mask_tokens_respects_attention_mask():
    ids = torch.full((4, 50), 7)
    attention = torch.zeros(4, 50, dtype=torch.long)
    attention[:, :10] = 1
    _, labels = mask_tokens(ids, [], 1, 100, torch.Generator().manual_seed(0), attention)
    assert bool((labels[:, 10:] == -100).all())
