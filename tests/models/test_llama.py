"""lmforge's Llama against transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM on
the same weights: logits, hidden states, padding, the KV cache, GQA, tied and untied heads, the
rope scaling variants, and the fused output layer."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.models.hf_llama import llama_config_from_hf, llama_from_hf  # noqa: E402
from lmforge.models.llama import Llama  # noqa: E402
from lmforge.models.llama_config import LlamaConfig, flops_per_token  # noqa: E402
from lmforge.models.registry import model_from_architecture  # noqa: E402
from lmforge.models.gpt import num_params  # noqa: E402

VOCAB = 97

CASES = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-mha-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama-linear-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                        rope_theta=500.0)),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, rope_theta=500.0)),
    "llama-wide-heads": ("llama", dict(num_key_value_heads=2, head_dim=32)),  # nh * hs = 128 > hidden 64
    "qwen2-qkv-bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
}


def hf_model(family: str, seed: int = 0, **extra):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[family]
    cfg = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, rms_norm_eps=1e-6, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norms, so a mapping mistake cannot hide behind zeros and ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def lmforge_twin(hf) -> Llama:
    arch, _ = llama_config_from_hf(hf.config.to_dict())
    model = model_from_architecture(arch).eval()
    state, missing = llama_from_hf(hf.state_dict(), list(model.state_dict()))
    assert not missing
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case):
    family, extra = CASES[case]
    hf = hf_model(family, **extra)
    ours = lmforge_twin(hf)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 40, VOCAB)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert ours.config.tie_embeddings == bool(extra.get("tie_word_embeddings", family == "llama" and False))
    if ours.config.tie_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_right_padding_and_kv_cache_match_full_forward():
    hf = hf_model("llama", num_key_value_heads=2)
    ours = lmforge_twin(hf)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        full = ours(ids)
        padded = ours(ids, attention_mask=mask)
        want = hf(ids, attention_mask=mask).logits
        cache = ours.new_kv_cache(2, 16)
        assert cache.k.shape == (2, 2, 2, 16, 16)  # (layers, batch, n_kv_head, max_len, head_dim): nkv heads cached
        first = ours(ids[:, :7], kv_cache=cache)
        rest = [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(padded[1, :8], want[1, :8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_fused_loss_equals_cross_entropy_and_grads_flow():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, context=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    ids = torch.randint(0, VOCAB, (3, 32))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    loss_sum, correct, counted = model(ids, targets=targets)
    logits = model(ids)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss_sum, want, atol=1e-3, rtol=1e-5)
    assert int(counted) == 3 * 31
    assert int(correct) == int(((logits.argmax(-1) == targets) & (targets != -100)).sum())
    loss_sum.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_hidden_states_and_flops_count_params():
    cfg = LlamaConfig(vocab_size=VOCAB, context=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      attention_bias="qkv", tie_embeddings=True)
    model = Llama(cfg)
    n = num_params(model, exclude_embeddings=True)
    assert flops_per_token(cfg) == 6 * n + 12 * 2 * 64 * 32
    ids = torch.randint(0, VOCAB, (1, 5))
    assert model.hidden_states(ids).shape == (1, 5, 64)


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ValueError, match="n_kv_head=3: must divide n_head=4"):
        LlamaConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="num_local_experts"):
        llama_config_from_hf({"model_type": "mistral", "num_local_experts": 8})
    with pytest.raises(ValueError, match="rope_scaling.rope_type='dynamic'"):
        llama_config_from_hf({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        llama_config_from_hf({"model_type": "llama", "hidden_act": "gelu"})


def test_sliding_window_shorter_than_context_becomes_the_context():
    arch, notes = llama_config_from_hf({"model_type": "mistral", "max_position_embeddings": 32768,
                                        "sliding_window": 4096})
    assert arch["context"] == 4096 and "sliding_window=4096" in notes[0]
    arch, notes = llama_config_from_hf({"model_type": "qwen2", "max_position_embeddings": 32768,
                                        "sliding_window": 4096, "use_sliding_window": False})
    assert arch["context"] == 32768 and not notes
