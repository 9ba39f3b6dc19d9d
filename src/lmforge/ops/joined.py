"""Weights that lie side by side in one buffer, so that a stacked product reads them without a copy.

A Llama block multiplies by q_proj | k_proj | v_proj stacked, and by gate_proj | up_proj: one
product each, over their weights concatenated. Concatenating them at every forward copies
every such weight once per step. `share_rows` puts a group of linear layers' weights (and
biases) into consecutive rows of one buffer, each parameter a view of its rows; `joined_rows`
then hands the product that buffer itself, and its backward gives each parameter its rows of
the gradient. The parameters keep their names, shapes and values: state dicts, checkpoints
and the Hugging Face map are unchanged.

Only the parameters `share_rows` made are joined, and only while they still lie side by side:
whatever separates them or stands in for them (moving the model to another device or dtype,
loading with `assign=True`, FSDP's shards and gathered copies, a deep copy) makes `joined_rows`
return None, and the caller concatenates, as before. The same numbers either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def share_rows(*linears: nn.Linear) -> None:
    """Give the layers' weights (and their biases, where every layer has one) one buffer each,
    in this order, with the values they have now."""
    for name in ("weight", "bias"):
        tensors = [getattr(lin, name) for lin in linears]
        if any(t is None for t in tensors):
            continue
        buffer = torch.cat([t.detach() for t in tensors])
        group = object()  # marks the parameters made here: only they are joined
        start = 0
        for lin, t in zip(linears, tensors):
            param = nn.Parameter(buffer[start:start + t.shape[0]], requires_grad=t.requires_grad)
            param._lmforge_rows_of = group
            setattr(lin, name, param)
            start += t.shape[0]


def joined_rows(tensors: list[Tensor]) -> Tensor | None:
    """torch.cat(tensors) without the copy where the tensors are consecutive rows of one buffer
    (`share_rows`), else None. Differentiable: each tensor gets its rows of the gradient."""
    first = tensors[0]
    group = getattr(first, "_lmforge_rows_of", None)
    if (torch.compiler.is_compiling() or group is None  # storage pointers are not traced
            or not all(type(t) is nn.Parameter and getattr(t, "_lmforge_rows_of", None) is group for t in tensors)):
        return None  # not share_rows' parameters: FSDP's gathered copies, DTensor shards, other tensors
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for t in tensors:  # share_rows made them contiguous rows of one dtype; what moves them changes storage
        if t.numel() == 0 or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return _JoinedRows.apply(*tensors)


class _JoinedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *tensors: Tensor) -> Tensor:
        ctx.rows = [t.shape[0] for t in tensors]
        first = tensors[0]
        shape = (sum(ctx.rows), *first.shape[1:])
        return first.as_strided(shape, (first[0].numel(), *first.stride()[1:]), first.storage_offset())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        return tuple(grad.split(ctx.rows))
