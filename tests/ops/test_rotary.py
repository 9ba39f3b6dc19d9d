"""The rotary turn and RMSNorm against their plain torch formulas (transformers' rotate_half,
LlamaRMSNorm), forward and backward, and the rope frequency variants."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.ops.rotary import RopeTables, apply_rotary, check_rope_scaling, rms_norm, rope_inverse_frequencies


def _rotate_half_reference(x, cos, sin_plain, hs):
    h = x.unflatten(-1, (-1, hs))
    x1, x2 = h[..., : hs // 2], h[..., hs // 2:]
    return (h * cos + torch.cat((-x2, x1), dim=-1) * sin_plain).flatten(-2)


def test_rotary_equals_rotate_half_and_its_gradient_is_exact():
    tables = RopeTables(8, 100.0, None, 16)
    cos, signed_sin = tables.window(3, 5, torch.device("cpu"), torch.float64)  # positions 3 .. 7
    sin_plain = torch.cat((signed_sin[..., 4:], signed_sin[..., 4:]), dim=-1)
    x = torch.randn(2, 5, 3 * 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(apply_rotary(x, cos, signed_sin, 8), _rotate_half_reference(x, cos, sin_plain, 8))
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, signed_sin, 8), (x,))
    angles = 4 * rope_inverse_frequencies(8, 100.0)  # position 4 is the window's second row
    torch.testing.assert_close(cos[1, 0, :4], angles.cos().double())


def test_rms_norm_equals_the_float64_formula_forward_and_backward():
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    w = torch.randn(32, dtype=torch.float64)
    grad = torch.randn(3, 7, 32, dtype=torch.float64)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = rms_norm(x32, w32, 1e-5)
    want = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    (got.double() * grad).sum().backward()
    (want * grad).sum().backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w32.grad.double(), w64.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # inference takes torch's op: the same numbers
        torch.testing.assert_close(rms_norm(x32, w32, 1e-5), got, atol=1e-6, rtol=1e-6)


def test_rope_scaling_variants():
    base = rope_inverse_frequencies(64, 10000.0)
    torch.testing.assert_close(rope_inverse_frequencies(64, 10000.0, {"rope_type": "linear", "factor": 4.0}), base / 4)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    scaled = rope_inverse_frequencies(64, 10000.0, llama3)
    wavelength = 2 * math.pi / base
    assert torch.equal(scaled[wavelength < 8192 / 4], base[wavelength < 8192 / 4])  # fast channels kept
    torch.testing.assert_close(scaled[wavelength > 8192], base[wavelength > 8192] / 8)  # slow ones 8x slower
    assert check_rope_scaling({"rope_type": "dynamic", "factor": 2.0})
    assert check_rope_scaling({"rope_type": "linear"}) == ["rope_scaling.factor=None: must be a positive number "
                                                           "for rope_type 'linear'"]
    assert check_rope_scaling(None) == [] and check_rope_scaling({"type": "linear", "factor": 2}) == []
