"""The Llama decode step against the forward, generation with and without the cache, and a
classifier on a Llama backbone."""

from __future__ import annotations

import pytest
import torch

from lmforge.inference.generate import SamplingConfig, generate
from lmforge.models.decoding import decoder_for
from lmforge.models.heads import SequenceClassifier, apply_trainable, blocks_and_final
from lmforge.models.llama import Llama
from lmforge.models.llama_config import LlamaConfig
from lmforge.models.llama_decode import LlamaDecoder


def _model(**overrides) -> Llama:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, attention_bias="qkv")
    return Llama(LlamaConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_decode_steps_equal_the_forward(n_kv_head):
    model = _model(n_kv_head=n_kv_head)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)  # (2, 10, V)
        cache = model.new_kv_cache(2, 16)
        assert cache.k.shape[2] == n_kv_head
        logits = [model(ids[:, :4], kv_cache=cache)]
        decoder = decoder_for(model)
        assert isinstance(decoder, LlamaDecoder)
        logits += [decoder.step(ids[:, t:t + 1], cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_with_cache_equals_without_and_slides_past_the_context():
    model = _model(tie_embeddings=True)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=30)  # 5 + 30 > context 24: the window slides
    with_cache = generate(model, [3, 1, 4, 1, 5], cfg)
    without = generate(model, [3, 1, 4, 1, 5], cfg, use_cache=False)
    assert with_cache == without and len(with_cache) == 30
    sampled = generate(model, [3], SamplingConfig(temperature=0.8, top_k=10, max_new_tokens=8, seed=3))
    assert sampled == generate(model, [3], SamplingConfig(temperature=0.8, top_k=10, max_new_tokens=8, seed=3))


def test_decoder_refuses_training_mode():
    with pytest.raises(ValueError, match="model.eval"):
        LlamaDecoder(_model().train())


def test_classifier_on_a_llama_backbone_trains_its_last_block():
    backbone = _model()
    clf = SequenceClassifier(backbone, num_labels=3, pooling="last")
    blocks, final = blocks_and_final(backbone)
    assert len(blocks) == 2 and final == [backbone.model.norm]
    trainable, total = apply_trainable(clf, "last_blocks:1")
    assert 0 < trainable < total and all(p.requires_grad for p in backbone.model.layers[1].parameters())
    assert not backbone.model.layers[0].self_attn.q_proj.weight.requires_grad
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    logits = clf(ids, mask)
    assert logits.shape == (2, 3)
    alone = clf(ids[1:, :4])  # the padded row's label reads its last real token
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)


def test_low_rank_adapters_on_llama_layers_take_part_in_forward_and_decode():
    from lmforge.ops.lora import LoRALinear

    model = _model()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(4))
    before = model(ids)
    block = model.model.layers[0]
    adapted = [(block.self_attn, "v_proj"), (block.self_attn, "o_proj"), (block.mlp, "gate_proj")]
    for module, name in adapted:
        setattr(module, name, LoRALinear(getattr(module, name), 4, 8.0))
        torch.nn.init.normal_(getattr(module, name).lora_B.weight)
    after = model(ids)
    assert not torch.allclose(before, after, atol=1e-4)  # every adapter's path is in the product
    after.sum().backward()
    assert all(getattr(m, n).lora_B.weight.grad.abs().sum() > 0 for m, n in adapted)
    with torch.inference_mode():
        cache = model.new_kv_cache(1, 8)
        steps = [model(ids[:, :4], kv_cache=cache)] + [decoder_for(model).step(ids[:, t:t + 1], cache)
                                                       for t in range(4, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), after.detach(), atol=1e-5, rtol=1e-5)
