"""Weights side by side in one buffer: the stacked product reads them in place, with the same
values and gradients as their concatenation, and falls back to it once they are separated."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.llama import Llama
from lmforge.models.llama_config import LlamaConfig
from lmforge.ops.joined import joined_rows, share_rows


def _layers(bias: bool) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(8, out, bias=bias) for out in (8, 4, 4)]


def test_shared_rows_keep_the_values_and_lie_in_one_buffer():
    layers = _layers(bias=True)
    before = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in layers]
    share_rows(*layers)
    for lin, (weight, bias) in zip(layers, before):
        assert isinstance(lin.weight, nn.Parameter) and torch.equal(lin.weight, weight)
        assert torch.equal(lin.bias, bias)
    storages = {lin.weight.untyped_storage().data_ptr() for lin in layers}
    assert len(storages) == 1


def test_joined_rows_are_the_buffer_itself_with_the_concatenation_s_gradients():
    layers = _layers(bias=True)
    share_rows(*layers)
    weights = [lin.weight for lin in layers]
    joined = joined_rows(weights)
    assert joined is not None and joined.data_ptr() == weights[0].data_ptr()  # no copy
    assert torch.equal(joined, torch.cat(weights))
    x = torch.randn(5, 8)
    (x @ joined.t()).square().sum().backward()
    ours = [w.grad.clone() for w in weights]
    for w in weights:
        w.grad = None
    (x @ torch.cat(weights).t()).square().sum().backward()
    for a, w in zip(ours, weights):
        assert torch.equal(a, w.grad)
    assert joined_rows([lin.bias for lin in layers]) is not None


def test_separated_or_reordered_tensors_are_not_joined():
    layers = _layers(bias=False)
    assert joined_rows([lin.weight for lin in layers]) is None  # never shared
    share_rows(*layers)
    weights = [lin.weight for lin in layers]
    assert joined_rows(weights[::-1]) is None
    assert joined_rows([weights[0], weights[2]]) is None  # a gap between them
    layers[1].weight = nn.Parameter(weights[1].detach().clone())
    assert joined_rows([lin.weight for lin in layers]) is None
    assert joined_rows([w.double() for w in weights]) is None
    assert joined_rows([w.detach() for w in weights]) is None  # adjacent, but not share_rows' parameters
    standing_in = [nn.Parameter(w.detach()) for w in weights]  # as FSDP's gathered copies would
    assert joined_rows(standing_in) is None


def test_a_llama_reads_its_stacked_weights_in_place_and_not_after_a_dtype_change():
    config = LlamaConfig(vocab_size=64, context=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                         tie_embeddings=False)
    model = Llama(config)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    parts = model.model.layers[0].parts()
    attention = model.model.layers[0].self_attn
    assert parts.qkv.weight.data_ptr() == attention.q_proj.weight.data_ptr()
    assert parts.gate_up.weight.data_ptr() == model.model.layers[0].mlp.gate_proj.weight.data_ptr()
    loss, _, _ = model(ids, targets=ids)
    double = Llama(config)
    double.load_state_dict(model.state_dict())  # copied into the shared buffers
    double = double.double()  # each parameter a tensor of its own: stacked by a copy again
    block = double.model.layers[0]
    assert block.parts().qkv.weight.data_ptr() != block.self_attn.q_proj.weight.data_ptr()
    loss64, _, _ = double(ids, targets=ids)
    torch.testing.assert_close(loss.double(), loss64.double(), rtol=1e-5, atol=1e-5)
