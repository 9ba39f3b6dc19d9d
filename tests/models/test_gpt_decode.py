import pytest
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.gpt_decode import Decoder


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("gelu_new", True), ("gelu", False)])
def test_decoder_logits_equal_the_module_forward_with_the_cache(activation, bias):
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
