"""import-hf / export --format hf for Llama, Qwen2 and Mistral folders, with tokenizer files, chat
template and generation config, and greedy generation against transformers' `generate`."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402

from lmforge.checkpoint import load_model  # noqa: E402
from lmforge.commands.interop import export_hf, import_hf  # noqa: E402
from lmforge.inference.generate import SamplingConfig, generate  # noqa: E402
from lmforge.inference.loaded import load_for_inference  # noqa: E402
from lmforge.inference.text import generate_texts  # noqa: E402

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
TEXT = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question"] * 20


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", chat_template=TEMPLATE)


def _hf_folder(tmp_path, family: str, shard: bool = False, **extra):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[family]
    cfg = cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    folder = tmp_path / f"hf-{family}"
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    model.generation_config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("family,shard,extra", [
    ("llama", False, dict(tie_word_embeddings=False)),
    ("qwen2", True, dict(tie_word_embeddings=True)),
    ("mistral", False, dict(sliding_window=None)),
])
def test_import_export_round_trip(tmp_path, family, shard, extra):
    src, hf = _hf_folder(tmp_path, family, shard=shard, **extra)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    ckpt = import_hf(src, tmp_path / "ckpt")
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == TEMPLATE and tok_config["bos_token"] == "<s>"
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == 2
    ours, _ = load_model(ckpt)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours.eval()(ids), want, atol=1e-4, rtol=1e-4)
    out = export_hf(ckpt, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen2" if family == "qwen2" else "llama")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-4, rtol=1e-4)
    tok, original = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(src)
    assert tok("the lazy fox").input_ids == original("the lazy fox").input_ids
    assert tok("the lazy fox").input_ids[0] == 1  # BOS kept by the post-processor
    assert tok.chat_template == TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_greedy_generation_equals_transformers_generate(tmp_path):
    src, hf = _hf_folder(tmp_path, "llama", tie_word_embeddings=False)
    ckpt = import_hf(src, tmp_path / "ckpt")
    loaded = load_for_inference(ckpt, device="cpu")
    prompt = [1, 5, 17, 33, 8]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                           pad_token_id=0, min_new_tokens=40)[0, len(prompt):].tolist()
    got = generate(loaded.model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=40))
    assert got == want
    text = generate_texts(loaded, ["the lazy"], SamplingConfig(temperature=0.0, max_new_tokens=5))[0]
    assert isinstance(text, str)


def test_unsupported_configs_are_refused_naming_the_field(tmp_path):
    src, _ = _hf_folder(tmp_path, "llama")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling.rope_type='yarn'"):
        import_hf(src, tmp_path / "ckpt")
    config["model_type"] = "mixtral"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'mixtral' is not supported"):
        import_hf(src, tmp_path / "ckpt")


def test_an_imported_model_fine_tunes_on_data_from_its_own_tokenizer(tmp_path):
    from lmforge.base.config import load_config
    from lmforge.data.prepare import prepare
    from lmforge.train.loop import train

    src, _ = _hf_folder(tmp_path, "qwen2", tie_word_embeddings=True)
    ckpt = import_hf(src, tmp_path / "ckpt")  # 96 embedding rows for the tokenizer's 80 tokens, as real ones pad
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT) * 3, encoding="utf-8")
    prepare("lm", [corpus], ckpt, tmp_path / "data", val_fraction=0.1, seed=1, show_progress=False)
    cfg = load_config(None, base={
        "model": {"kind": "llama", "preset": None, "init_from": str(ckpt)}, "data": {"path": str(tmp_path / "data")},
        "train": {"max_steps": 2, "batch_size": 2, "eval_every": 2, "eval_batches": 1, "sample_tokens": 0},
        "run": {"out_dir": str(tmp_path), "name": "ft"}})
    result = train(cfg, quiet=True)
    assert result.steps == 2
    config = json.loads((result.run_dir / "checkpoints" / "last" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["attention_bias"] == "qkv" and config["vocab_size"] == 96
