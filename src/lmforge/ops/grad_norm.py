"""The global norm of a step's gradients, as gradient clipping reads it.

Float32 gradients on a CPU go through lmforge's kernel (kernels/squares.cpp) where it is
loaded: one pass over all of them on every thread, summed in float64 in fixed blocks (the same
bits on any number of threads), where torch's `_foreach_norm` takes the tensors one after
another on one thread. Anything else (GPU, sharded or other-dtype gradients) goes through
`torch.nn.utils.get_total_norm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.ops import kernels


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all the gradients together, as a 0-dim tensor of their dtype."""
    library = kernels.ops(build=False)
    if library is not None and grads and all(_plain_cpu_float(g) for g in grads):
        return library.sum_of_squares(grads).sqrt().to(torch.float32)
    return torch.nn.utils.get_total_norm(grads)


def _plain_cpu_float(g: Tensor) -> bool:
    return (type(g) is Tensor and g.layout == torch.strided and g.device.type == "cpu"
            and g.dtype == torch.float32 and g.is_contiguous())
