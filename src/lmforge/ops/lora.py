"""A linear layer with a low-rank adapter (LoRA): y = x W^T + b + scale * dropout(x) A^T B^T.

`LoRALinear` is an `nn.Linear` whose own weight and bias keep their names and stay frozen, plus
`lora_A` (rank, in) and `lora_B` (out, rank), the names peft gives them. B starts at zero: a new
adapter leaves the model's output exactly as it was.

Without adapter dropout (or in eval mode) the layer is one autograd Function, `_LoRAProduct`:
the forward adds scale * B A to the frozen weight (an (out, in) sum, cheap beside the product)
and makes one product with the merged weight, as a plain linear layer does; the backward makes
the merged weight again (keeping it would hold a second copy of every adapted weight until the
backward) for dX, and dA, dB from four thin products of rank columns. So the
step has the frozen layer's two big products and no (out, in) weight gradient, where the adapter
written as separate products (x A^T, then B, summed onto the output) passes over the (N, out)
output and the (N, in) input gradient several times more. With adapter dropout the adapter
path is its own product on the dropped input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lmforge.ops.dropout import Dropout
from lmforge.ops.product import linear


class _LoRAProduct(torch.autograd.Function):
    """x (N, in) -> x (W + scale B A)^T + b (N, out); gradients for x, A and B only (W, b frozen)."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scale: float) -> Tensor:
        # the merged weight is made again in the backward, not kept: a model's worth of weights otherwise
        ctx.save_for_backward(rows, weight, lora_a, lora_b)
        ctx.scale = scale
        return F.linear(rows, torch.addmm(weight, lora_b, lora_a, alpha=scale), bias)  # (N, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        rows, weight, lora_a, lora_b = ctx.saved_tensors
        grad_rows = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad @ torch.addmm(weight, lora_b, lora_a, alpha=ctx.scale)  # (N, in): g (W + scale B A)
        if ctx.needs_input_grad[4]:  # dB = scale g^T (x A^T): the scale on the thin (in, rank) factor
            grad_b = grad.t() @ (rows @ (lora_a.t() * ctx.scale))  # (out, rank)
        if ctx.needs_input_grad[3]:  # dA = scale (g B)^T x
            grad_a = (grad @ (lora_b * ctx.scale)).t() @ rows  # (rank, in)
        return grad_rows, None, None, grad_a, grad_b, None


def lora_product(rows: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                 scale: float) -> Tensor:
    """rows (N, in) (W + scale B A)^T + b, (N, out), differentiable in rows, A and B (W, b frozen)."""
    return _LoRAProduct.apply(rows, weight, bias, lora_a, lora_b, scale)


class LoRALinear(nn.Linear):
    """`base`'s weight and bias (the same Parameter objects, frozen) plus a rank-`rank` adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.scale = rank, alpha / rank
        self.lora_dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in): every product on rows, none re-shaped in the backward
        if self._merges(rows):
            out = lora_product(rows, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scale)
            return out.view(*x.shape[:-1], self.out_features)  # (..., out)
        out = F.linear(rows, self.weight, self.bias)  # (N, out)
        h = F.linear(self.lora_dropout(rows), self.lora_A.weight)  # (N, rank)
        # B's product, the scale and the sum in one pass over the output; out of place: an in-place
        # product on a view would make the backward copy the whole output gradient
        out = torch.addmm(out, h, self.lora_B.weight.t(), alpha=self.scale)  # (N, out)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out)

    def _merges(self, rows: Tensor) -> bool:
        """Whether the forward can run on the merged weight (`_LoRAProduct`): no adapter dropout in
        play, no autocast (which would cast the products), and the frozen weight really frozen."""
        dropping = self.training and self.lora_dropout.p > 0
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        return (not dropping and frozen and rows.dtype == self.weight.dtype
                and not torch.is_autocast_enabled(rows.device.type))

    def delta_weight(self) -> Tensor:
        """scale * B @ A (out, in): what merging adds to the frozen weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + scale * B @ A (and the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale:g}"


class Stacked(tuple):
    """Linear layers whose outputs lie side by side (a Llama's q, k, v), when one has an adapter:
    `project` runs each and concatenates (without adapters the model stacks their weights)."""


def project(x: Tensor, layer) -> Tensor:
    """layer's product x W^T + b, with its adapter's path where it has one; `layer` is a module,
    a `Stacked` of them, or anything with a `weight` (out, in) and a `bias`."""
    if isinstance(layer, LoRALinear):
        return layer(x)
    if isinstance(layer, Stacked):
        return torch.cat([project(x, one) for one in layer], dim=-1)  # (..., sum of outs)
    return linear(x, layer.weight, layer.bias)
