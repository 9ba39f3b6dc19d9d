"""train.lora: adapters on a frozen base for every task, adapter-only checkpoints naming the base
by path and sha256, optimizer state for the adapters alone, exact resume, merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_MODEL, tiny_run
from lmforge.base.config import ConfigError, load_config
from lmforge.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from lmforge.models.lora import merge_adapters
from lmforge.models.registry import model_from_architecture
from lmforge.ops.lora import LoRALinear
from lmforge.train.loop import train

LORA = {"rank": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def gpt_base(lm_data, tmp_path_factory) -> Path:
    """A random tiny GPT saved as a checkpoint (what model.init_from names)."""
    torch.manual_seed(0)
    vocab = json.loads((lm_data / "meta.json").read_text())["vocab_size"]
    arch = {"model_type": "gpt", "vocab_size": vocab, "context": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
            "dropout": 0.0, "activation": "gelu"}
    path = tmp_path_factory.mktemp("base") / "gpt"
    save_checkpoint(path, model_state=model_from_architecture(arch).state_dict(), model_config=arch,
                    tokenizer_file=lm_data / "tokenizer.json")
    return path


def lora_run(lm_data: Path, out: Path, base: Path, name: str = "lora", **train_opts) -> dict:
    cfg = tiny_run(lm_data, out, **{"max_steps": 4, "eval_every": 2, "lora": dict(LORA), **train_opts})
    cfg["model"] = {"init_from": str(base)}
    cfg["run"]["name"] = name
    return cfg


def test_a_lora_run_trains_the_adapters_only_and_saves_them_alone(lm_data, gpt_base, tmp_path, capsys):
    result = train(load_config(None, base=lora_run(lm_data, tmp_path, gpt_base)))
    header = capsys.readouterr().out
    assert "trainable (" in header and "LoRA rank 4" in header and "AdamW state" in header
    last = result.run_dir / "checkpoints" / "last"
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        stored = sorted(f.keys())
    # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B): no copy of the frozen base
    assert len(stored) == 16 and all(".lora_A." in k or ".lora_B." in k for k in stored)
    config = json.loads((last / "config.json").read_text())
    base_manifest = json.loads((gpt_base / "manifest.json").read_text())
    assert config["lora"]["base"] == {"path": str(gpt_base.absolute()), "prefix": "",
                                      "sha256": base_manifest["files"]["model.safetensors"]["sha256"]}
    ckpt = load_checkpoint(last, with_training_state=True)
    base = load_checkpoint(gpt_base).state_dict
    for name, tensor in base.items():  # the frozen base is bitwise what it was
        assert torch.equal(ckpt.state_dict[name], tensor), name
    assert any(not torch.equal(ckpt.state_dict[k], torch.zeros_like(ckpt.state_dict[k]))
               for k in stored if ".lora_B." in k)  # B started at zero and learned
    # optimizer state exists for the adapter parameters alone
    optim_state = ckpt.training_state["optimizer"]["state"]
    assert sorted(optim_state) == stored


def test_merged_weights_are_base_plus_scale_b_a_and_give_the_same_logits(lm_data, gpt_base, tmp_path):
    result = train(load_config(None, base=lora_run(lm_data, tmp_path, gpt_base)), quiet=True)
    model, ckpt = load_model(result.run_dir / "checkpoints" / "last")
    model.eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        adapted = model(ids)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected = {name: m.weight + 2.0 * (m.lora_B.weight @ m.lora_A.weight) for name, m in layers.items()}
    merged = merge_adapters(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    for name, weight in expected.items():
        assert torch.equal(merged.get_submodule(name).weight, weight), name
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)


def test_a_lora_run_resumes_exactly(lm_data, gpt_base, tmp_path):
    whole = train(load_config(None, base=lora_run(lm_data, tmp_path, gpt_base, "whole")), quiet=True)
    cut = lora_run(lm_data, tmp_path, gpt_base, "halves", save_every=2)
    cut["train"]["max_steps"] = 2
    train(load_config(None, base=cut), quiet=True)
    cut["train"]["max_steps"] = 4
    resumed = train(load_config(None, base=cut), resume_from=tmp_path / "halves" / "checkpoints" / "last",
                    quiet=True)
    assert resumed.steps == whole.steps == 4
    a = load_checkpoint(whole.run_dir / "checkpoints" / "last").state_dict
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_settings_are_checked(lm_data, gpt_base, tmp_path):
    with pytest.raises(ConfigError, match="train.lora.rank"):
        load_config(None, base=tiny_run(lm_data, tmp_path, lora={"rank": -1}))
    with pytest.raises(ConfigError, match="train.trainable"):
        load_config(None, base=tiny_run(lm_data, tmp_path, trainable="head", lora={"rank": 2}))
    cfg = load_config(None, overrides=["data.path=" + str(lm_data), "train.lora.rank=2"], base={})
    assert cfg.train.lora.rank == 2
    with pytest.raises(ValueError, match="model.init_from"):
        train(load_config(None, base=tiny_run(lm_data, tmp_path, lora={"rank": 2})), quiet=True)
    with pytest.raises(ValueError, match="match no linear layer"):
        train(load_config(None, base=lora_run(lm_data, tmp_path, gpt_base, lora={"rank": 2, "targets": ["qkv"]})),
              quiet=True)


def test_an_adapter_names_its_base_and_a_new_run_can_start_from_it_merged(lm_data, gpt_base, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(gpt_base, base)
    result = train(load_config(None, base=lora_run(lm_data, tmp_path, base, max_steps=3)), quiet=True)
    last = result.run_dir / "checkpoints" / "last"
    adapted, _ = load_model(last)
    merged = merge_adapters(adapted)
    # a full fine-tune from the adapter checkpoint starts from the merged weights
    cfg = tiny_run(lm_data, tmp_path, max_steps=1, lr=1e-9, warmup_steps=0)
    cfg["model"], cfg["run"]["name"] = {"init_from": str(last)}, "from-adapter"
    after = load_checkpoint(train(load_config(None, base=cfg), quiet=True).run_dir / "checkpoints" / "last")
    assert "lora" not in after.model_config
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(after.state_dict[name], value, atol=1e-6, rtol=0)
    # the base changed, then moved: both named
    state = load_checkpoint(base).state_dict
    save_checkpoint(base, model_state={k: v + 1 for k, v in state.items()}, model_config=adapted_config(base),
                    tokenizer_file=lm_data / "tokenizer.json")
    with pytest.raises(CheckpointError, match="has changed"):
        load_checkpoint(last)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=f"frozen base checkpoint {base} .* is not there"):
        load_checkpoint(last)


def adapted_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# -- to and from peft ------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_a_peft_export_loads_onto_its_base_in_peft_with_the_same_logits(lm_data, gpt_base, tmp_path):
    from lmforge.commands.interop import export_peft
    from lmforge.commands.interop import export_hf, import_hf

    result = train(load_config(None, base=lora_run(lm_data, tmp_path, gpt_base)), quiet=True)
    ckpt = result.run_dir / "checkpoints" / "last"
    ours, _ = load_model(ckpt)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        expected = ours.eval()(ids)
    out = export_peft(ckpt, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["fan_in_fan_out"] is True
    assert "transformer.h.0.attn.c_attn" in config["target_modules"]
    base = transformers.GPT2LMHeadModel.from_pretrained(out / "base")
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="--merge"):
        export_hf(ckpt, tmp_path / "merged")
    merged = transformers.GPT2LMHeadModel.from_pretrained(export_hf(ckpt, tmp_path / "merged", merge=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    # a base + peft adapter folder imports as one lmforge model with the adapters merged
    back, _ = load_model(import_hf(out / "base", tmp_path / "imported", adapter=out))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids), expected, atol=1e-4, rtol=1e-4)


def test_lora_on_a_bert_classifier_exports_to_peft_with_its_head(tmp_path):
    from lmforge.base.tokenizer import train_tokenizer
    from lmforge.commands.interop import export_peft
    from lmforge.data.prepare_classify import prepare_classify
    from lmforge.inference.classifier import class_probabilities, load_classifier

    words, spam = "see you at the bus stop later ok going home now".split(), "win free prize claim cash".split()
    lines = [f"{'spam' if i % 3 == 0 else 'ham'}\t{' '.join(words[i % 5:i % 5 + 4])}"
             + (f" {spam[i % 5]} {spam[(i + 2) % 5]}" if i % 3 == 0 else "") for i in range(90)]
    (tmp_path / "sms.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer([tmp_path / "sms.tsv"], kind="wordpiece", vocab_size=120, out_dir=tmp_path / "tok",
                          text_column=1, lowercase=True, show_progress=False)
    prepare_classify([tmp_path / "sms.tsv"], tok, tmp_path / "data", fmt="sms", show_progress=False)
    torch.manual_seed(0)
    vocab = json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"]
    arch = {"model_type": "bert", "vocab_size": vocab, "context": 32, "n_layer": 2, "n_head": 2, "n_embd": 16,
            "intermediate_size": 24, "dropout": 0.0}
    base = save_checkpoint(tmp_path / "bert", model_state=model_from_architecture(arch).state_dict(),
                           model_config=arch, tokenizer_file=tok)
    cfg = {"model": {"init_from": str(base)}, "data": {"path": str(tmp_path / "data")},
           "train": {"task": "classify", "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "max_steps": 6,
                     "eval_every": 3, "eval_batches": 1, "lora": {"rank": 2, "targets": ["query", "value"]}},
           "run": {"out_dir": str(tmp_path / "runs"), "name": "bert-lora"}}
    result = train(load_config(None, base=cfg), quiet=True)
    ckpt = result.run_dir / "checkpoints" / "last"
    saved = load_checkpoint(ckpt).model_config["lora"]
    assert saved["base"]["prefix"] == "backbone." and saved["trainable"] == ["classifier"]
    out = export_peft(ckpt, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(out / "base")
    model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    loaded, _ = load_classifier(ckpt, device="cpu")
    texts = ["win free prize now", "see you at the bus stop"]
    expected = class_probabilities(loaded, texts).log()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "base")
    with torch.no_grad():
        for i, text in enumerate(texts):
            logits = model(**hf_tok(text, return_tensors="pt")).logits[0]
            torch.testing.assert_close(torch.log_softmax(logits, -1), expected[i], atol=1e-4, rtol=1e-4)


def test_lora_on_a_llama_adapts_every_projection_and_merges_to_the_same_logits():
    from lmforge.models.lora import add_adapters, default_targets, resolve_spec

    torch.manual_seed(0)
    arch = {"model_type": "llama", "vocab_size": 64, "context": 16, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
            "n_embd": 32, "intermediate_size": 48}
    model = model_from_architecture(arch).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids)
    assert {n.rsplit(".", 1)[-1] for n in default_targets(model)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    spec = resolve_spec(model, 4, 8.0, 0.0, [], [], {"path": "-", "sha256": "-", "prefix": ""})
    add_adapters(model, spec)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)  # B starts at zero: nothing changes yet
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.1)
        adapted = model(ids)
    assert not torch.allclose(adapted, before, atol=1e-3)  # every adapter is on the path
    model.train()
    model(ids).float().square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads) and len(grads) == 2 * len(spec["targets"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merge_adapters(model)(ids), adapted, atol=1e-5, rtol=1e-5)
