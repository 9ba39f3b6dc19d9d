"""Rotary position embeddings and RMSNorm: the two pieces of a Llama-class block that GPT lacks.

- `rope_inverse_frequencies(head_dim, theta, scaling)`: the rotation speed of each pair of
  channels, theta^(-2i / head_dim), with the frequency rewrites imported configs use:
  "linear" (positions divided by `factor`, as position interpolation) and "llama3" (Llama 3.1's
  band-wise rewrite: slow channels divided by `factor`, fast ones kept, the band between
  blended). Any other `rope_type` is refused by `check_rope_scaling`, naming the field.
- `RopeTables`: cos / sin of every position, made once per device and dtype and sliced per call.
- `apply_rotary(x, cos, signed_sin, head_dim)`: rotates each head of x (..., heads * head_dim) in the
  "half split" layout transformers' Llama uses (channel i pairs with channel i + head_dim / 2).
- `rms_norm(x, weight, eps)`: x / sqrt(mean(x^2) + eps) * weight (torch's fused op where it has one).

Float32 on a CPU, both go through lmforge's C++ kernels where they are available
(ops/kernels/llama_block.cpp: one pass over the rows forward and backward); torch's ops otherwise,
with the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.ops import kernels

ROPE_TYPES = ("default", "linear", "llama3")
"""Rope scaling types lmforge computes; dynamic NTK, yarn, longrope and the others are refused."""


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> list[str]:
    """Problems with a rope_scaling dict (transformers' form: {"rope_type" or "type", "factor", ...})."""
    if scaling is None:
        return []
    if not isinstance(scaling, Mapping):
        return [f"rope_scaling={scaling!r}: must be null or an object with rope_type and factor"]
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        return [f"rope_scaling.rope_type={kind!r} is not supported (lmforge computes: {', '.join(ROPE_TYPES)})"]
    problems = []
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}.get(kind, ())
    for name in needed:
        value = scaling.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            problems.append(f"rope_scaling.{name}={value!r}: must be a positive number for rope_type {kind!r}")
    if kind == "llama3" and not problems and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        problems.append("rope_scaling: low_freq_factor must be below high_freq_factor")
    return problems


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> Tensor:
    """(head_dim / 2,) float32 angles per position of each channel pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (hs / 2,)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    return inv_freq


def _llama3_frequencies(inv_freq: Tensor, scaling: Mapping[str, Any]) -> Tensor:
    """Channels whose wavelength exceeds the original context / low_freq_factor turn `factor` times
    slower, those shorter than original context / high_freq_factor stay, and the band between is a
    linear blend of the two, by where the wavelength falls."""
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    slow = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)  # 0 at the slow edge, 1 at the fast edge
    blended = (1 - blend) * slow / factor + blend * slow
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, blended, slow)


class RopeTables:
    """cos and sin (positions, head_dim) of the rotary angles, per device and dtype, built for the
    positions asked so far (a 128k context costs nothing until a sequence is that long)."""

    def __init__(self, head_dim: int, theta: float, scaling: Mapping[str, Any] | None, positions: int) -> None:
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        self.positions = positions
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def get(self, device: torch.device, dtype: torch.dtype, length: int) -> tuple[Tensor, Tensor]:
        """cos and signed sin (>= length, hs) of positions 0, 1, ... (`apply_rotary` takes them)."""
        key = (device, dtype)
        if key not in self._tables or self._tables[key][0].shape[0] < length:
            built = min(self.positions, max(length, 256, 2 * (self._tables[key][0].shape[0] if key in self._tables else 0)))
            angles = torch.outer(torch.arange(built, dtype=torch.float32), self.inv_freq)  # (P, hs / 2)
            cos = torch.cat((angles.cos(), angles.cos()), dim=-1)  # (P, hs): one angle for both channels of a pair
            signed_sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)  # (P, hs)
            self._tables[key] = (cos.to(device, dtype), signed_sin.to(device, dtype))
        return self._tables[key]

    def window(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin of positions start .. start + length, (length, 1, hs) to broadcast over heads."""
        cos, sin = self.get(device, dtype, start + length)
        return cos[start:start + length, None], sin[start:start + length, None]  # (T, 1, hs)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor, head_dim: int) -> Tensor:
    """x (B, T, n * hs) with cos / signed_sin (T, 1, hs), or rows x (B, n * hs) with (1, hs): each
    head's channel pairs (i, i + hs / 2) turned by their angle; same shape as x.

    x cos + swap(x) sin', with swap exchanging the halves and sin' the sine with its first half
    negated (`RopeTables` keeps it so): transformers' q cos + rotate_half(q) sin. Its backward is
    the opposite turn, so nothing of x is kept for it (`_Rotary`)."""
    if _rows_match(x, cos) and kernels.applies_to(x):
        width = cos.shape[-1]  # (T, 1, hs) or a decode step's (1, hs) -> (T, hs)
        tables = (cos.reshape(-1, width).contiguous(), signed_sin.reshape(-1, width).contiguous())
        if not torch.is_grad_enabled():  # inference: the kernel without autograd's wrapper
            return kernels.ops().rotary(x.contiguous(), *tables, False)
        return _KernelRotary.apply(x.contiguous(), *tables)
    if not torch.is_grad_enabled():  # inference (a decode step): the same ops without autograd's wrapper
        heads = x.unflatten(-1, (-1, head_dim))  # (B, T, n, hs)
        return torch.addcmul(heads * cos, _swap_halves(heads), signed_sin).flatten(-2)
    return _Rotary.apply(x, cos, signed_sin, head_dim)


def _rows_match(x: Tensor, cos: Tensor) -> bool:
    """Whether row r of x (..., W) takes the angles of row r % P of cos as a (P, hs) table: cos
    is one position's, or its leading dimensions (less the heads' 1) end x's."""
    lead = tuple(cos.shape[:-1])
    if len(lead) > 1 and lead[-1] == 1:
        lead = lead[:-1]  # (..., 1, hs): the dimension that broadcasts over heads
    rows = tuple(x.shape[:-1])
    return lead == (1,) or (len(lead) <= len(rows) and rows[len(rows) - len(lead):] == lead)


def _swap_halves(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


class _KernelRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return kernels.ops().rotary(x, cos, signed_sin, False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        cos, signed_sin = ctx.saved_tensors
        return kernels.ops().rotary(grad.contiguous(), cos, signed_sin, True), None, None


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, signed_sin: Tensor, head_dim: int) -> Tensor:
        ctx.save_for_backward(cos, signed_sin)
        ctx.head_dim = head_dim
        heads = x.unflatten(-1, (-1, head_dim))  # (B, T, n, hs)
        return torch.addcmul(heads * cos, _swap_halves(heads), signed_sin).flatten(-2)  # (B, T, n * hs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        cos, signed_sin = ctx.saved_tensors
        g = grad.unflatten(-1, (-1, ctx.head_dim))  # (B, T, n, hs)
        return (g * cos).add_(_swap_halves(g * signed_sin)).flatten(-2), None, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight, in float32 as transformers computes it.

    Float32 with gradients goes through `_RMSNorm`: one pass for the norms, two for the output,
    and a backward in a few passes (torch's CPU rms_norm is a chain of elementwise ops, each with
    its own backward); without gradients, torch's. Other dtypes (bf16 under autocast) go through
    float32 as transformers does."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if weight.device.type == "cpu" and kernels.applies_to(x):
            if not torch.is_grad_enabled():  # inference: the kernel without autograd's wrapper
                return kernels.ops().rms_norm(x.contiguous(), weight.contiguous(), float(eps))[0]
            return _KernelRMSNorm.apply(x.contiguous(), weight.contiguous(), float(eps))
        if not torch.is_grad_enabled() and hasattr(F, "rms_norm"):  # inference (a decode step): one call into torch
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        return _RMSNorm.apply(x, weight, float(eps))
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_residual(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x, rms_norm(x, weight, eps)) for an x that also goes on as the residual stream.

    On the kernel path with gradients, one Function returns both: its backward adds the
    gradient arriving through the residual to the norm's own in the kernel's pass over the rows,
    where autograd would sum the two in a pass of its own."""
    if (x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.is_grad_enabled()
            and kernels.applies_to(x)):
        return _KernelResidualRMSNorm.apply(x.contiguous(), weight.contiguous(), float(eps))
    return x, rms_norm(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        width = x.shape[-1]
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width)  # (..., 1)
        rstd = mean_square.add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)  # (..., C)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors  # x (..., C), rstd (..., 1)
        rows, r = x.reshape(-1, x.shape[-1]), rstd.reshape(-1, 1)  # (N, C), (N, 1)
        g = grad.reshape(rows.shape)  # (N, C)
        grad_weight = torch.mm(torch.mul(g, rows).t(), r).view(-1) if ctx.needs_input_grad[1] else None  # sum_n g x r
        grad_x = None
        if ctx.needs_input_grad[0]:
            scaled = g * weight  # d loss / d normed, normed = x r
            dot = torch.bmm(scaled.unsqueeze(1), rows.unsqueeze(2)).view(-1, 1)  # (N, 1): sum_c scaled x
            coef = dot.mul_(r.pow(2)).div_(-x.shape[-1])  # -(scaled . normed) r / C
            grad_x = torch.addcmul(scaled, rows, coef).mul_(r).view(x.shape)  # r (scaled - normed mean(scaled normed))
        return grad_x, grad_weight, None


class _KernelRMSNorm(torch.autograd.Function):
    """`_RMSNorm` in lmforge's C++ kernels: one pass per row forward, one backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out, rstd = kernels.ops().rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = kernels.ops().rms_norm_backward(grad.contiguous(), x, weight, rstd)
        return grad_x, grad_weight.view(weight.shape), None


class _KernelResidualRMSNorm(torch.autograd.Function):
    """(x, `_KernelRMSNorm`(x)): x's gradient from both uses summed in the norm's backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        out, rstd = kernels.ops().rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return x, out  # x returned as it is: autograd passes its gradient to this backward

    @staticmethod
    def backward(ctx, grad_residual: Tensor, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = kernels.ops().rms_norm_backward(grad.contiguous(), x, weight, rstd,
                                                              grad_residual.contiguous())
        return grad_x, grad_weight.view(weight.shape), None
