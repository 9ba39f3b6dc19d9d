"""A weight packed once as the right operand of several float32 products on a CPU.

MKL copies (packs) both operands of every product into its internal layout. Where one weight
multiplies many blocks of rows in a row (the fused output layer's logits, h_b @ W^T, and input
gradients, E_b @ W, block after block), packing it once for all of them saves a copy of the
whole weight per block (`kernels/packed_product.cpp`: MKL's packed-gemm API). Without the
kernels, or with a BLAS that lacks the API, `right_operand` returns None and callers make plain
products: the same sums, perhaps not the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.ops import kernels


class PackedOperand:
    """B = w^T (transposed) or w, packed for products a (rows, k) @ B."""

    def __init__(self, packed: Tensor, library, rows: int) -> None:
        self.packed, self.library, self.rows = packed, library, rows

    def fits(self, a: Tensor) -> bool:
        """Whether a (or a block like it) has the rows this packing is for."""
        return a.shape[0] == self.rows

    def product_into(self, a: Tensor, out: Tensor) -> Tensor:
        """out = a @ B for a block of exactly `rows` rows."""
        return self.library.packed_product_out(a, self.packed, out)


def right_operand(w: Tensor, *, transposed: bool, rows: int, uses: int) -> PackedOperand | None:
    """w packed for `uses` products with `rows`-row left operands, or None where packing does not
    pay (one use) or cannot be had (not a float32 CPU matrix, no kernels, no packed BLAS)."""
    if uses < 2 or not (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.stride(1) == 1):
        return None
    library = kernels.ops(build=False)
    if library is None or not library.has_packed_products():
        return None
    return PackedOperand(library.pack_right_operand(w, transposed, rows), library, rows)
