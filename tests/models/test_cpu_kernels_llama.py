"""The Llama block's C++ kernels (the attention's rotary, rotary, rms_norm, swiglu, decode_attention) against
the torch path: the same numbers forward and backward, with grouped (GQA), single (MQA) and
per-head key / value heads, odd head sizes and widths; and a whole Llama with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.llama import Llama
from lmforge.models.llama_config import LlamaConfig
from lmforge.ops import kernels
from lmforge.ops.grouped_attention import attend_projected
from lmforge.ops.rotary import RopeTables, rms_norm, rms_norm_residual
from lmforge.ops.swiglu import swiglu

ops = kernels.ops()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")
# (n_head, n_kv_head, head_dim): GQA, MQA, MHA, and a group of 3 (the kernel's passes: 2 heads, then 1)
HEADS = [(4, 2, 8), (6, 1, 10), (3, 3, 6), (8, 4, 16), (6, 2, 8)]


def _layout_reference(qkv, cos, signed_sin, nh, nkv, hs):
    """The written-out rope of q and k: (B, T, (nh + 2 nkv) hs), v as it is."""
    qk, v = qkv.split(((nh + nkv) * hs, nkv * hs), dim=-1)
    h = qk.unflatten(-1, (-1, hs))
    swapped = torch.cat((h[..., hs // 2:], h[..., :hs // 2]), dim=-1)
    return torch.cat(((h * cos[:, None] + swapped * signed_sin[:, None]).flatten(-2), v), dim=-1)


def _tables(hs, T, start=2, dtype=torch.float32):
    cos, sin = RopeTables(hs, 10000.0, None, 128).window(start, T, torch.device("cpu"), dtype)
    return cos.squeeze(1), sin.squeeze(1)  # (T, hs)


@needs_kernels
@pytest.mark.parametrize("nh,nkv,hs", HEADS)
@pytest.mark.parametrize("causal,keep", [(True, False), (True, True), (False, False)])
def test_attention_turning_q_and_k_itself_matches_it_on_the_turned_layout(nh, nkv, hs, causal, keep):
    """keep: the forward keeps its probabilities for the backward."""
    torch.manual_seed(nh)
    B, T = 3, 70
    x64 = torch.randn(B, T, (nh + 2 * nkv) * hs, dtype=torch.float64, requires_grad=True)
    cos64, sin64 = _tables(hs, T, dtype=torch.float64)
    turned = _layout_reference(x64, cos64, sin64, nh, nkv, hs)  # q and k turned in float64
    grad = torch.randn(B, T, nh * hs)
    want, lse = ops.self_attention(turned.detach().float(), nh, causal, None, 0.0, 0, nkv)
    grad_turned = ops.self_attention_backward(grad, turned.detach().float(), want, lse, nh, causal, None, 0.0, 0, nkv)
    (want_grad,) = torch.autograd.grad(turned, x64, grad_turned.double())  # turned back in float64
    cos, sin = _tables(hs, T)
    x = x64.detach().float()
    probs = torch.empty(0) if keep else None
    got, got_lse = ops.self_attention(x, nh, causal, None, 0.0, 0, nkv, cos, sin, probs)
    got_grad = ops.self_attention_backward(grad, x, got, got_lse, nh, causal, None, 0.0, 0, nkv, cos, sin, probs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("nh,nkv,hs", HEADS)
def test_attend_projected_is_the_same_with_and_without_kernels(nh, nkv, hs, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 9, (nh + 2 * nkv) * hs)
    rope = tuple(t[:, None] for t in _tables(hs, 9, start=0))  # (T, 1, hs), as the model passes them
    grad = torch.randn(2, 9, nh * hs)
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        leaf = x.clone().requires_grad_()
        y = attend_projected(leaf, rope, nh, nkv, hs, causal=True)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("nh,nkv,hs", HEADS)
@pytest.mark.parametrize("start", [0, 6])
def test_decode_attention_writes_the_cache_and_attends_as_the_torch_path(nh, nkv, hs, start, monkeypatch):
    torch.manual_seed(start)
    B, L = 2, 12
    caches = torch.randn(2, B, nkv, L, hs)
    qkv = torch.randn(B, (nh + 2 * nkv) * hs)
    cos, sin = _tables(hs, 1, start=start)  # (1, hs): the one position, as the decode step passes it
    _decode_with_and_without_kernels(monkeypatch, qkv, (cos, sin), caches, nh, nkv, hs, start, start + 1)
    k, v = caches.clone()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.decode_attention_masked(qkv, cos, sin, None, k, v, L, nh)


@needs_kernels
def test_decode_attention_with_each_row_at_its_own_position(monkeypatch):
    """Rows of a batched server step sit at different positions: one angle row each."""
    nh, nkv, hs, B, L = 4, 2, 8, 3, 10
    caches = torch.randn(2, B, nkv, L, hs)
    qkv = torch.randn(B, (nh + 2 * nkv) * hs)
    cos, sin = (t[torch.tensor([2, 7, 4])].unsqueeze(-2) for t in RopeTables(hs, 10000.0, None, 16).get(
        torch.device("cpu"), torch.float32, 16))  # (B, 1, hs)
    _decode_with_and_without_kernels(monkeypatch, qkv, (cos, sin), caches, nh, nkv, hs, 5, None)


def _decode_with_and_without_kernels(monkeypatch, qkv, rope, caches, nh, nkv, hs, start, columns) -> None:
    """A decode step's output and its caches (the first `columns`, all with None) are the same
    with the kernels as with torch's path."""
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        k, v = caches.clone()
        with torch.no_grad():
            y = attend_projected(qkv, rope, nh, nkv, hs, causal=False, kv=(k, v), start=start)
        results.append((y, k[:, :, :columns], v[:, :, :columns]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape,T", [((2, 5, 3 * 10), 5), ((4, 2 * 8), 1)])
def test_rotary_kernel_and_its_backward_are_the_turn_and_its_transpose(shape, T):
    hs = shape[-1] // (3 if len(shape) == 3 else 2)
    cos, sin = _tables(hs, T)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c, s = (cos.double(), sin.double()) if len(shape) == 3 else (cos.double()[0], sin.double()[0])
    h = x.unflatten(-1, (-1, hs))
    swapped = torch.cat((h[..., hs // 2:], h[..., :hs // 2]), dim=-1)
    want = (h * c.unsqueeze(-2) + swapped * s.unsqueeze(-2)).flatten(-2)
    grad = torch.randn_like(want)
    want.backward(grad)
    torch.testing.assert_close(ops.rotary(x.detach().float(), cos, sin, False).double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.rotary(grad.float(), cos, sin, True).double(), x.grad, atol=1e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 11, 64), (2000, 33)])
def test_rms_norm_kernel_matches_float64_forward_and_gradients(shape):
    torch.manual_seed(shape[-1])
    x64 = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    w64 = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    grad = torch.randn(shape, dtype=torch.float64)
    want = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    want.backward(grad)
    x, w = x64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    got = rms_norm(x, w, 1e-6)
    got.backward(grad.float())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # the inference path (a decode step) takes the same kernel
        torch.testing.assert_close(rms_norm(x, w, 1e-6), got.detach())


@needs_kernels
def test_rms_norm_with_the_residual_adds_both_gradients_of_x_in_its_pass():
    torch.manual_seed(5)
    x64 = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    grad_res, grad_norm = torch.randn(2, 3, 9, 16, dtype=torch.float64)
    want = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.autograd.backward((x64, want), (grad_res, grad_norm))
    x, w = x64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    residual, got = rms_norm_residual(x, w, 1e-6)
    torch.autograd.backward((residual, got), (grad_res.float(), grad_norm.float()))
    assert torch.equal(residual, x)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 2 * 7), (5, 2 * 704), (1, 2)])
def test_swiglu_kernel_matches_torch_forward_and_gradients_even_far_from_zero(shape):
    torch.manual_seed(shape[-1])
    x64 = torch.randn(shape, dtype=torch.float64) * 4
    x64.view(-1)[0], x64.view(-1)[-1] = 95.0, -95.0  # sigmoid's tails, where exp would overflow
    x64.requires_grad_()
    gate, up = x64.chunk(2, dim=-1)
    want = F.silu(gate) * up
    grad = torch.randn_like(want)
    want.backward(grad)
    x = x64.detach().float().requires_grad_()
    got = swiglu(x)
    got.backward(grad.float())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-5)


@needs_kernels
def test_swiglu_consuming_its_input_gives_the_same_gradients_and_refuses_a_second_backward():
    torch.manual_seed(7)
    x = torch.randn(6, 2 * 704, requires_grad=True)
    weight = torch.randn(2 * 704, 2 * 704) / 40
    grads = []
    for consume in (False, True):
        x.grad = None
        swiglu(x @ weight, consume=consume).square().sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    out = swiglu(x @ weight, consume=True).square().sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()  # the activation was overwritten by its gradient
    leaf = torch.randn(3, 8, requires_grad=True)
    before = leaf.detach().clone()
    swiglu(leaf, consume=True).sum().backward()
    assert torch.equal(leaf.detach(), before)  # a leaf is never overwritten


@needs_kernels
def test_kernels_refuse_what_they_cannot_read():
    cos, sin = _tables(8, 4)
    with pytest.raises(RuntimeError, match="multiple of n_kv_head"):
        ops.self_attention(torch.zeros(1, 4, 7 * 8), 3, True, None, 0.0, 0, 2, cos, sin)
    with pytest.raises(RuntimeError, match=r"rotary tables must be contiguous float32 \(T, hs\)"):
        ops.self_attention(torch.zeros(1, 3, 8 * 8), 4, True, None, 0.0, 0, 2, cos, sin)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(torch.zeros(2, 4, dtype=torch.float64), torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="even"):
        ops.swiglu(torch.zeros(2, 5))


@needs_kernels
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_llama_gives_the_same_loss_and_gradients_with_and_without_kernels(n_kv_head, monkeypatch):
    config = LlamaConfig(vocab_size=97, context=40, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=48,
                         tie_embeddings=False)
    tokens = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        torch.manual_seed(0)
        model = Llama(config)
        loss_sum, correct, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, correct_a, grads_a), (loss_b, correct_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-4)
    assert correct_a == correct_b
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)
