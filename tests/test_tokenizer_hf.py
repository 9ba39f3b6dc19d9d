"""Hugging Face tokenizer folders in lmforge: Llama-style sentencepiece BPE and Qwen2 byte-level
BPE encode a mixed English/Chinese text to the ids transformers' AutoTokenizer gives, BOS
included; tokenizer_config.json's named tokens, flags and template are read as transformers
reads them, and bad values are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_tokenizer_folders import LLAMA2_CHAT, MIXED_TEXT, llama_folder, qwen2_folder
from lmforge.base.tokenizer import decode, load_tokenizer, special_ids
from lmforge.base.tokenizer_config import encode_text, settings_file_dict, tokenizer_settings

transformers = pytest.importorskip("transformers")

TEXTS = [MIXED_TEXT, "a <s> b </s> c", "  leading spaces and 中文", "<|im_start|>user\n你好<|im_end|>", "x"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tok")
    return {"llama": llama_folder(root / "llama"), "qwen2": qwen2_folder(root / "qwen2")}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ids_equal_autotokenizer(folders: dict[str, Path], kind: str):
    folder = folders[kind]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok, settings = load_tokenizer(folder), tokenizer_settings(folder)
    for text in TEXTS:
        expected = hf(text)["input_ids"]
        assert encode_text(tok, text, settings) == expected, text
        assert encode_text(tok, text, settings, add_special_tokens=False) == hf(text, add_special_tokens=False)[
            "input_ids"]
        assert decode(tok, expected, skip_special_tokens=True) == hf.decode(expected, skip_special_tokens=True)
    chinese = [t for t in hf.convert_ids_to_tokens(hf(MIXED_TEXT)["input_ids"]) if t]
    assert len(chinese) > 10  # the text really went through the merges, not one token per text


def test_bos_and_named_tokens_follow_the_folder(folders: dict[str, Path]):
    llama_tok = load_tokenizer(folders["llama"])
    llama = special_ids(llama_tok, tokenizer_settings(folders["llama"]))
    assert (llama.bos, llama.eos, llama.unk) == (1, 2, 0)
    assert encode_text(llama_tok, "hi", tokenizer_settings(folders["llama"]))[0] == 1  # <s> first, as Llama adds
    qwen_tok = load_tokenizer(folders["qwen2"])
    qwen = special_ids(qwen_tok, tokenizer_settings(folders["qwen2"]))
    assert qwen.bos is None and qwen.eos == qwen_tok.token_to_id("<|im_end|>")
    assert qwen.pad == qwen_tok.token_to_id("<|endoftext|>")
    assert special_ids(qwen_tok).eos == qwen_tok.token_to_id("<|endoftext|>")  # without the folder: a guess
    assert tokenizer_settings(folders["llama"]).chat_template == LLAMA2_CHAT  # from chat_template.jinja


def test_a_copy_keeps_template_and_bos_flag(folders: dict[str, Path], tmp_path: Path):
    data = settings_file_dict(folders["llama"], load_tokenizer(folders["llama"]))
    assert data["chat_template"] == LLAMA2_CHAT and data["add_bos_token"] is True
    assert data["add_eos_token"] is False and data["bos_token"] == "<s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(data), encoding="utf-8")
    stripped = json.loads((folders["llama"] / "tokenizer.json").read_text(encoding="utf-8"))
    stripped["post_processor"] = None  # as import-hf keeps it: lmforge adds specials itself
    (tmp_path / "tokenizer.json").write_text(json.dumps(stripped), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(folders["llama"]))
    assert encode_text(tok, MIXED_TEXT, tokenizer_settings(tmp_path)) == hf(MIXED_TEXT)["input_ids"]


def test_added_token_objects_and_named_templates(tmp_path: Path):
    config = {"eos_token": {"content": "</s>", "lstrip": False, "__type": "AddedToken"}, "bos_token": None,
              "add_bos_token": False,
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}), encoding="utf-8")
    settings = tokenizer_settings(tmp_path)
    assert settings.tokens == {"eos_token": "</s>"} and settings.add_bos is False
    assert settings.chat_template == "D" and settings.generation_eos_ids == (2, 7)


@pytest.mark.parametrize("config, key", [
    ({"eos_token": 5}, "eos_token"),
    ({"add_bos_token": "yes"}, "add_bos_token"),
    ({"chat_template": [{"name": "other", "template": "x"}]}, "chat_template"),
])
def test_bad_settings_are_named(tmp_path: Path, config: dict, key: str):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"tokenizer_config\.json: '{key}'"):
        tokenizer_settings(tmp_path)


def test_broken_config_json_names_the_file(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        tokenizer_settings(tmp_path)


@pytest.mark.parametrize("legacy", [None, True])
def test_a_llama2_style_file_encodes_as_transformers_5_builds_it(tmp_path: Path, legacy: bool | None):
    """Llama 2 / Mistral files carry a Prepend("▁") + Replace normalizer; transformers 5 builds
    its own Metaspace pipeline for LlamaTokenizer instead, which differs after special tokens."""
    folder = llama_folder(tmp_path / "llama")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    if legacy is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}), encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok, settings = load_tokenizer(folder), tokenizer_settings(folder)
    for text in [*TEXTS, "<s>[INST] hi [/INST] ok </s>", "  two spaces"]:
        ids = hf(text)["input_ids"]
        assert encode_text(tok, text, settings) == ids, text
        assert decode(tok, ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
