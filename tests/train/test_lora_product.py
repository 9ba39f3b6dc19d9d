"""ops.lora's merged-weight product: its gradients against the plain formula
x W^T + b + scale (x A^T) B^T (gradcheck in float64), what it leaves frozen, and the layers
that keep the separate adapter product (adapter dropout while training, autocast)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.ops.lora import LoRALinear, lora_product


def _adapter(in_features: int = 6, out_features: int = 5, rank: int = 3, dtype=torch.float64,
             dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, dtype=dtype), rank, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # a trained adapter: B away from its zero start
    return layer


def _merged(out: torch.Tensor) -> bool:
    """Whether `out` came from the merged-weight product (possibly through a view)."""
    fn = out.grad_fn
    while fn is not None and fn.name() == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return fn is not None and "_LoRAProduct" in fn.name()


def _plain(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The formula, written with autograd's own products."""
    return (x @ layer.weight.t() + layer.bias
            + layer.scale * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t())


def test_the_product_passes_gradcheck_in_float64():
    layer = _adapter()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_product(x, layer.weight, layer.bias, a, b, layer.scale),
                                    (x, a, b))


def test_the_layer_gives_the_formula_s_output_and_gradients_and_none_for_the_frozen_weight():
    layer = _adapter()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)  # (B, T, in): rows inside
    grad = torch.randn(2, 4, 5, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 4, 5) and _merged(out)
    got = torch.autograd.grad(out, (x, layer.lora_A.weight, layer.lora_B.weight), grad)
    want_out = _plain(layer, x)
    want = torch.autograd.grad(want_out, (x, layer.lora_A.weight, layer.lora_B.weight), grad)
    torch.testing.assert_close(out, want_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    out = layer(x)
    out.backward(grad)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_without_an_input_gradient_the_adapter_still_learns():
    layer = _adapter()
    x = torch.randn(5, 6, dtype=torch.float64)  # a frozen embedding's output: no gradient wanted
    layer(x).sum().backward()
    want = torch.autograd.grad(_plain(layer, x).sum(), (layer.lora_A.weight, layer.lora_B.weight))
    torch.testing.assert_close(layer.lora_A.weight.grad, want[0])
    torch.testing.assert_close(layer.lora_B.weight.grad, want[1])


def test_a_new_adapter_leaves_the_output_bitwise_as_the_base_gives_it():
    torch.manual_seed(1)
    base = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    want = base(x)
    assert torch.equal(LoRALinear(base, 2, alpha=4.0)(x), want)  # B = 0: W + scale B A is W exactly


def test_adapter_dropout_while_training_keeps_the_separate_product_and_eval_merges():
    layer = _adapter(dropout=0.5)
    x = torch.randn(64, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert not _merged(out)
    assert not torch.allclose(out, _plain(layer, x))  # half the adapter's inputs were dropped
    layer.eval()
    out = layer(x)
    assert _merged(out)
    torch.testing.assert_close(out, _plain(layer, x))


def test_under_autocast_the_products_are_cast_as_autocast_casts_them():
    layer = _adapter(dtype=torch.float32)
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _plain(layer, x), atol=0.1, rtol=0.05)


def test_a_trainable_base_weight_gets_its_gradient():
    layer = _adapter()
    layer.weight.requires_grad_(True)  # someone unfroze it: the plain products, so W learns too
    x = torch.randn(3, 6, dtype=torch.float64)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.autograd.grad(_plain(layer, x).sum(), layer.weight)[0])
