"""Text in, text out (`lmforge.inference.text`): several prompts at once, streaming, empty prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmforge.base.tokenizer import load_tokenizer
from lmforge.checkpoint import save_checkpoint
from lmforge.inference.generate import SamplingConfig, generate
from lmforge.inference.loaded import LoadedModel, load_for_inference
from lmforge.inference.text import generate_texts, stream_text
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "O", "KING HENRY:\nWhat"]


@pytest.fixture(scope="module")
def loaded(lm_data: Path, tmp_path_factory) -> LoadedModel:
    tokenizer = lm_data / "tokenizer.json"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=load_tokenizer(tokenizer).get_vocab_size(), context=32, n_layer=2,
                          n_head=2, n_embd=32, dropout=0.0))
    arch = {"model_type": "gpt", **dataclasses.asdict(model.config)}
    path = save_checkpoint(tmp_path_factory.mktemp("text") / "ckpt", model_state=model.state_dict(),
                           model_config=arch, tokenizer_file=tokenizer)
    return load_for_inference(path, "cpu")


def _alone(loaded: LoadedModel, prompt: str, cfg: SamplingConfig) -> str:
    """The obvious way: encode, generate token ids until end-of-text, decode."""
    ids = loaded.tokenizer.encode(prompt).ids or [loaded.specials.eos]
    cfg = dataclasses.replace(cfg, stop_ids=(loaded.specials.eos,))
    return loaded.tokenizer.decode(generate(loaded.model, ids, cfg), skip_special_tokens=True)


def test_several_prompts_greedy_equal_each_prompt_alone(loaded):
    cfg = SamplingConfig(max_new_tokens=40, temperature=0)  # 40 + prompt > context: the window slides
    texts = generate_texts(loaded, PROMPTS, cfg)
    assert texts == [_alone(loaded, p, cfg) for p in PROMPTS]
    assert texts == [generate_texts(loaded, [p], cfg)[0] for p in PROMPTS]
    assert texts == ["".join(stream_text(loaded, p, cfg)) for p in PROMPTS]
    assert len(set(texts)) == len(PROMPTS) and all(texts)  # varied, non-empty continuations


def test_sampled_prompts_share_one_seeded_generator(loaded):
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, seed=5)
    texts = generate_texts(loaded, PROMPTS, cfg)
    assert texts == generate_texts(loaded, PROMPTS, cfg)  # same seed, same texts
    generator = torch.Generator().manual_seed(5)  # one generator, the prompts in order
    assert texts == ["".join(stream_text(loaded, p, cfg, generator)) for p in PROMPTS]
    assert generate_texts(loaded, ["O", "O"], cfg)[0] != generate_texts(loaded, ["O", "O"], cfg)[1]


def test_an_empty_prompt_starts_a_new_document(loaded):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    (text,) = generate_texts(loaded, [""], cfg)
    eos = loaded.specials.eos
    assert text == loaded.tokenizer.decode(generate(loaded.model, [eos], dataclasses.replace(cfg, stop_ids=(eos,))),
                                           skip_special_tokens=True)
    assert generate_texts(loaded, [], cfg) == []


def test_only_a_gpt_generates_text(loaded):
    bert = Bert(BertConfig(vocab_size=loaded.architecture["vocab_size"], context=16, n_layer=1, n_head=2,
                           n_embd=16))
    other = dataclasses.replace(loaded, model=bert)
    with pytest.raises(ValueError, match="a Bert checkpoint cannot generate text"):
        generate_texts(other, ["ROMEO:"], SamplingConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match="a Bert checkpoint cannot generate text"):
        stream_text(other, "ROMEO:", SamplingConfig(max_new_tokens=3))  # at the call, before any piece
