"""A linear layer with a low-rank adapter (LoRA): y = x W^T + b + scale * dropout(x) A^T B^T.

`LoRALinear` is an `nn.Linear` whose own weight and bias keep their names and stay frozen, plus
`lora_A` (rank, in) and `lora_B` (out, rank), the names peft gives them. The adapter path is
computed apart from the frozen product, so the backward never forms the (out, in) gradient of
the frozen weight; only the two thin products are learned. B starts at zero: a new adapter
leaves the model's output exactly as it was.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.ops.dropout import Dropout


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
        out = F.linear(rows, self.weight, self.bias)  # (N, out)
        h = F.linear(self.lora_dropout(rows), self.lora_A.weight)  # (N, rank)
        # B's product, the scale and the sum in one pass over the output; out of place: an in-place
        # product on a view would make the backward copy the whole output gradient
        out = torch.addmm(out, h, self.lora_B.weight.t(), alpha=self.scale)  # (N, out)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out)

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


def project(x: Tensor, linear) -> Tensor:
    """linear's product x W^T + b, with its adapter's path where it has one; `linear` is a module,
    a `Stacked` of them, or anything with a `weight` (out, in) and a `bias`."""
    if isinstance(linear, LoRALinear):
        return linear(x)
    if isinstance(linear, Stacked):
        return torch.cat([project(x, one) for one in linear], dim=-1)  # (..., sum of outs)
    return F.linear(x, linear.weight, linear.bias)
