"""The Llama block's kernels split rows over threads: two threads give one thread's bits (the
rest of the suite runs on one intra-op thread, tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops import kernels
from lmforge.ops.rotary import RopeTables

ops = kernels.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


def _all_kernels(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, T, nh, nkv, hs, C, I = 3, 37, 4, 2, 16, 48, 40
    cos, sin = (t[:T].contiguous() for t in RopeTables(hs, 10000.0, None, T).get(torch.device("cpu"),
                                                                                   torch.float32, T))
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, generator=g)
    grad_out = torch.randn(B, T, nh * hs, generator=g)
    x, grad_x = torch.randn(B * T, C, generator=g), torch.randn(B * T, C, generator=g)
    weight = torch.randn(C, generator=g)
    gate_up, grad_up = torch.randn(B * T, 2 * I, generator=g), torch.randn(B * T, I, generator=g)
    normed, rstd = ops.rms_norm(x, weight, 1e-6)
    k_cache, v_cache = torch.randn(2, B, nkv, T, hs, generator=g)
    step = ops.decode_attention_masked(qkv[:, 5].contiguous(), cos[5:6], sin[5:6], None, k_cache, v_cache, 5, nh)
    out, lse = ops.self_attention(qkv, nh, True, None, 0.0, 0, nkv, cos, sin)
    grad_qkv = ops.self_attention_backward(grad_out, qkv, out, lse, nh, True, None, 0.0, 0, nkv, cos, sin)
    probs = torch.empty(0)  # the forward's probabilities kept for the backward
    ops.self_attention(qkv, nh, True, None, 0.0, 0, nkv, cos, sin, probs)
    grad_kept = ops.self_attention_backward(grad_out, qkv, out, lse, nh, True, None, 0.0, 0, nkv, cos, sin, probs)
    return [out, lse, grad_qkv, probs, grad_kept,
            ops.rotary(qkv, cos, sin, False), normed, rstd, *ops.rms_norm_backward(grad_x, x, weight, rstd),
            ops.swiglu(gate_up), ops.swiglu_backward(grad_up, gate_up), step, k_cache, v_cache]


def test_llama_kernels_give_the_same_bits_on_one_and_two_threads():
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_all_kernels(seed=3))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)
