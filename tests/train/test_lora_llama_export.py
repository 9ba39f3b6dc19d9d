"""LoRA on a Llama-class model leaves lmforge as transformers + peft use it: the adapter folder
loads onto the exported LlamaForCausalLM with peft, and the merged export, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.models.registry import model_from_architecture
from lmforge.train.loop import train

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_a_llama_lora_run_exports_a_peft_adapter_and_a_merged_model_with_the_same_logits(lm_data, tmp_path):
    from lmforge.commands.interop import export_hf, export_peft

    torch.manual_seed(0)
    vocab = json.loads((lm_data / "meta.json").read_text())["vocab_size"]
    arch = {"model_type": "llama", "vocab_size": vocab, "context": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
            "n_embd": 32, "intermediate_size": 48, "tie_embeddings": False}
    base = save_checkpoint(tmp_path / "base", model_state=model_from_architecture(arch).state_dict(),
                           model_config=arch, tokenizer_file=lm_data / "tokenizer.json")
    cfg = tiny_run(lm_data, tmp_path, max_steps=3, eval_every=3, lora={"rank": 4, "alpha": 8.0}, lr=1e-2)
    cfg["model"] = {"init_from": str(base)}
    ckpt = train(load_config(None, base=cfg), quiet=True).run_dir / "checkpoints" / "last"
    ours, _ = load_model(ckpt)
    ids = torch.randint(0, vocab, (2, 20))
    with torch.no_grad():
        expected = ours.eval()(ids)
        untouched, _ = load_model(base)
        assert not torch.allclose(untouched.eval()(ids), expected, atol=1e-4)  # the adapters changed the model

    out = export_peft(ckpt, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    hf_base = transformers.LlamaForCausalLM.from_pretrained(out / "base")
    model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "merged", merge=True))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged.eval()(ids).logits, expected, atol=1e-4, rtol=1e-4)
