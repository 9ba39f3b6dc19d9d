import pytest
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models import gpt_decode
from lmforge.models.gpt_decode import Decoder


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("gelu_new", True), ("gelu", False)])
def test_decoder_logits_equal_the_module_forward_with_the_cache(activation, bias, monkeypatch):
    monkeypatch.setattr(gpt_decode, "KERNEL_ROWS", 0)  # block by block: the forward's own operators
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, context=16, n_layer=2, n_head=2, n_embd=32, activation=activation,
                          bias=bias)).eval()
    prompt = torch.randint(0, 61, (2, 5))
    steps = torch.randint(0, 61, (2, 6))
    with torch.inference_mode():
        ref_cache, our_cache = model.new_kv_cache(2), model.new_kv_cache(2)
        model(prompt, kv_cache=ref_cache)
        model(prompt, kv_cache=our_cache)
        decoder = Decoder(model)
        for i in range(steps.shape[1]):
            token = steps[:, i:i + 1]
            expected = model(token, kv_cache=ref_cache)
            assert torch.equal(decoder.step(token, our_cache), expected)
            assert our_cache.length == ref_cache.length == 6 + i
        assert torch.equal(our_cache.k, ref_cache.k) and torch.equal(our_cache.v, ref_cache.v)


def test_decoder_refuses_training_mode_and_a_full_cache():
    model = GPT(GPTConfig(vocab_size=11, context=4, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="model.eval"):
        Decoder(model.train())
    decoder = Decoder(model.eval())
    cache = model.new_kv_cache(1, max_len=2)
    with torch.inference_mode():
        decoder.step(torch.tensor([[1]]), cache)
        decoder.step(torch.tensor([[2]]), cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            decoder.step(torch.tensor([[3]]), cache)


def test_decoder_runs_the_forwards_block_code_with_biases_and_untied_values(monkeypatch):
    """Non-zero biases and LayerNorm parameters: any difference in the order of the additions
    between the block-by-block decode step and the forward would show as unequal bits (the
    whole-model kernel's closeness is tests/models/test_gpt_decode_rows.py's)."""
    monkeypatch.setattr(gpt_decode, "KERNEL_ROWS", 0)
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=61, context=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, 61, (3, 9))
    with torch.inference_mode():
        ref_cache, our_cache = model.new_kv_cache(3), model.new_kv_cache(3)
        model(ids[:, :4], kv_cache=ref_cache)
        model(ids[:, :4], kv_cache=our_cache)
        decoder = Decoder(model)
        for i in range(4, 9):
            assert torch.equal(decoder.step(ids[:, i:i + 1], our_cache), model(ids[:, i:i + 1], kv_cache=ref_cache))
        full, first = model(ids), decoder.step(ids[:, :1], model.new_kv_cache(3))
    torch.testing.assert_close(first, full[:, :1], rtol=0, atol=1e-5)  # and the cache-free forward
