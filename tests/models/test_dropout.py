import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.ops.attention import sdpa as attention
from lmforge.ops.dropout import Dropout, dropout, keep_mask


def test_keep_mask_keeps_the_asked_share_and_follows_the_seed():
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), 0.1)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert mask.float().mean().item() == pytest.approx(0.9, abs=2e-3)
    assert keep_mask((7, 3), 0.5).shape == (7, 3)  # a size that is not a multiple of four
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 1000), 0.1), mask)


def test_dropout_scales_the_kept_values_and_its_gradient_is_the_same_mask():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(1)
    out = dropout(x, 0.25, training=True)
    torch.manual_seed(1)
    mask = keep_mask(x.shape, 0.25)
    torch.testing.assert_close(out, x * mask / 0.75)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * mask / 0.75)


def test_dropout_is_the_identity_in_eval_or_at_zero_and_keeps_nn_dropout_semantics():
    x = torch.randn(5, 6)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
    layer = Dropout(0.3)
    assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.3 and not list(layer.parameters())
    assert torch.equal(layer.eval()(x), x)
    assert (layer.train()(torch.ones(1000)) == 0).any()


def _reference(q, k, v, attn_mask, is_causal, keep, p):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    return (torch.softmax(scores, -1) * keep / (1 - p)) @ v


@pytest.mark.parametrize("is_causal, padded", [(True, False), (False, True)])  # GPT, BERT
def test_attention_with_dropout_matches_the_math_with_the_same_mask(is_causal, padded):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, requires_grad=True) for _ in range(3))
    attn_mask = None
    if padded:  # (B, 1, 1, S): the second sequence has 3 pad keys
        attn_mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        attn_mask[1, ..., 7:] = False
    torch.manual_seed(3)
    out = attention(q, k, v, attn_mask, is_causal, 0.2)
    torch.manual_seed(3)
    keep = keep_mask((2, 3, 10, 10), 0.2)
    ours = torch.autograd.grad(out.sum(), (q, k, v))
    ref = _reference(q, k, v, attn_mask, is_causal, keep, 0.2)
    theirs = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_attention_without_dropout_is_torch_sdpa():
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, None, True, 0.0),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
