"""The output projection and next-token cross-entropy of a GPT, fused (float32 and bf16 autocast).

Unfused, the (N, V) logits of a step make many passes through memory: the projection writes
them, `F.cross_entropy` writes a log-softmax as large, its backward allocates and zero-fills a
gradient and writes it again, and accuracy reads them once more for the row maximum; and all
N x V of them stay alive until the backward (1.6 GB for GPT-2's vocabulary at 8 x 1024 tokens).

Fused, the forward takes the rows in blocks: it projects a block, turns it in place into
E = exp(logits - row max) (row max, sum of exponentials s, target logit; the max also decides
accuracy), and while the block is still in cache multiplies it into both gradients, which
never need the logits' gradient G = diag(w / s) E - onehot * w (w: d loss / d row):
G @ W = (w / s) * (E @ W) - w * W[targets] and G^T @ H = E^T @ ((w / s) * H) - onehot^T (w * H)
(the float32 CPU row pass below takes s off E's target places instead, E - s onehot, so the
products give the whole of both).
The forward computes them with w = 1 on the rows that have a target; the backward only scales
them by d loss / d loss_sum. Only one block of logits ever exists, and the gradients are
computed only when autograd will ask for them. For float32 on a CPU the row pass (target
logit, maximum, exponentials, sum) is lmforge's C++ kernel (`kernels/softmax_rows.cpp`), one
sweep per row instead of torch's four, and the weight is packed once for the blocks' logits and
input-gradient products instead of by MKL at each of them (`ops/packed.py`).

Rows without a target (prompts and padding in fine-tuning, the last position of each row in
pretraining) are left out before the projection once they are at least 1/64 of the rows, on
a CPU: there finding them costs nothing, while on a GPU it would wait for the device.

Under bf16 autocast the three products run in bf16 (the block is kept in bf16, as autocast
would cast the logits' gradient for them) and every softmax sum in float32. On a CPU with AMX
units that was 60% of the bf16 step when done the unfused way (log-softmax over float32 copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge.ops import kernels, packed
from lmforge.ops.packed import PackedOperand
from lmforge.base.metrics import IGNORE_INDEX, count_correct
from lmforge.base.runtime import autocast_dtype

_BLOCK_BYTES = 16 << 20  # float32 logits per block: the block stays in cache between its passes
_MIN_BLOCK_ROWS = 512  # the weight gradient is added to once per block: thin blocks make that slow
_GPU_BLOCK_BYTES = 1 << 30  # on a GPU, blocks only bound the float32 copy of bf16 logits
_SKIP_FRACTION = 1 / 64  # left-out rows below this share are not worth gathering the others


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_sum, correct, counted) of logits hidden @ weight.T against targets; -100 is ignored.

    hidden (N, C), weight (V, C), targets (N,). loss_sum is the summed cross-entropy
    (differentiable in hidden and weight), correct counts the rows whose target logit is the
    row maximum (argmax accuracy barring exact ties), counted the targets that are not -100.
    The fused path runs in float32, and under bf16 autocast with the products in bf16 and the
    softmax in float32, as autocast would; under fp16 autocast and torch.compile the plain one
    (projection, then `F.cross_entropy`) gives the same numbers.
    """
    rows = _rows_with_targets(targets)
    if rows is not None:  # the gather's backward puts zeros in the left-out rows' gradient
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    dtype = autocast_dtype(hidden.device.type) or hidden.dtype
    fused = (dtype in (torch.float32, torch.bfloat16) and hidden.dtype == weight.dtype == torch.float32
             and not torch.compiler.is_compiling())
    if fused:
        grads = torch.is_grad_enabled()
        return _LMHeadCrossEntropy.apply(hidden, weight, targets, dtype, grads and hidden.requires_grad,
                                         grads and weight.requires_grad)
    return reference_lm_head_cross_entropy(hidden, weight, targets)


def reference_lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`lm_head_cross_entropy` the plain way: the projection, then `F.cross_entropy` (the path
    under fp16 autocast and torch.compile, and the reference the fused path is tested against)."""
    logits = F.linear(hidden, weight).float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct, counted = count_correct(logits, targets)
    return loss_sum, correct, counted


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype,
                grad_hidden_needed: bool, grad_weight_needed: bool) -> tuple[Tensor, Tensor, Tensor]:
        h, w = hidden.to(dtype), weight.to(dtype)  # the copies autocast would make for F.linear
        valid = targets != IGNORE_INDEX
        index = targets.clamp(min=0)
        n = h.shape[0]
        target_logit = torch.empty(n, device=h.device)
        row_max, sum_exp = torch.empty_like(target_logit), torch.empty_like(target_logit)
        # The gradients, less the factor d loss / d loss_sum that only the backward knows.
        grad_h = torch.empty(n, h.shape[1], device=h.device) if grad_hidden_needed else None
        grad_w = torch.empty(w.shape, device=w.device) if grad_weight_needed else None
        rows = _block_rows(n, w.shape[0], h.device)
        logits = torch.empty(min(n, rows), w.shape[0], device=h.device, dtype=dtype)  # reused by every block
        row_pass = _cpu_row_pass(logits, build=grad_hidden_needed or grad_weight_needed)
        # W packed once for the full blocks' products where the BLAS can (ops/packed.py)
        w_t = packed.right_operand(w, transposed=True, rows=rows, uses=n // rows)
        w_right = packed.right_operand(w, transposed=False, rows=rows, uses=n // rows) if grad_h is not None else None
        for start in range(0, n, rows):
            end = min(n, start + rows)
            with torch.autocast(h.device.type, enabled=False):
                block = logits[:end - start]
                if w_t is not None and w_t.fits(block):
                    w_t.product_into(h[start:end], block)
                else:
                    torch.mm(h[start:end], w.t(), out=block)
            stats = (index[start:end], target_logit[start:end], row_max[start:end], sum_exp[start:end])
            if row_pass is not None:  # the same steps in one pass over each row, the target term folded in
                row_pass(block, *stats, True)
            else:
                _torch_row_pass(block, *stats)
            scale = (valid[start:end] / sum_exp[start:end])[:, None]  # softmax = exp * scale
            if grad_h is not None:
                _product_into(grad_h[start:end], block, w, w_right).mul_(scale)
            if grad_w is not None:
                _product_into(grad_w, block.t(), (h[start:end].float() * scale).to(dtype), accumulate=start > 0)
        if row_pass is None:  # the target term (- onehot in G), which the kernel's row pass folds into E
            every_row = h.device.type == "cpu" and bool(valid.all())  # no rows to mask (on a CPU: no sync)
            if grad_h is not None:
                picked = w[index].float()
                grad_h.sub_(picked if every_row else picked.mul_(valid[:, None]))
            if grad_w is not None:
                grad_w.index_add_(0, index, hidden.float() if every_row else hidden.float() * valid[:, None], alpha=-1)
        loss_sum = torch.where(valid, sum_exp.log() + row_max - target_logit, 0.0).sum()
        correct = ((target_logit >= row_max) & valid).sum()
        counted = valid.sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct, counted)
        return loss_sum, correct, counted

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _correct, _counted) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss,
                None, None, None, None)


def _torch_row_pass(block: Tensor, index: Tensor, target_logit: Tensor, row_max: Tensor, sum_exp: Tensor) -> None:
    """The row pass in torch's ops: target logits, row maxima, E = exp(logits - max) in place and
    its row sums."""
    target_logit.copy_(block.gather(1, index[:, None]).squeeze(1))
    exp = block.float()  # the block itself when the logits are float32
    peak = exp.amax(dim=1)
    row_max.copy_(peak)
    sum_exp.copy_(exp.sub_(peak[:, None]).exp_().sum(dim=1))
    if exp.data_ptr() != block.data_ptr():
        block.copy_(exp)  # E in the products' dtype, as autocast would cast the logits' gradient


def _cpu_row_pass(logits: Tensor, build: bool):
    """lmforge's C++ row pass (target logit, max, exp in place, sum) for float32 logits on a
    CPU, or None: torch's ops then make the same numbers in four passes. build: training use,
    which may build the kernels (else only a finished build is loaded)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return None
    ops = kernels.ops(build=build)
    return None if ops is None else ops.softmax_rows_


def _rows_with_targets(targets: Tensor) -> Tensor | None:
    """Indices of the rows that have a target, or None to project every row: off a CPU, under
    torch.compile (data-dependent shapes), when too few rows are ignored, or when all are."""
    if targets.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    valid = targets != IGNORE_INDEX
    kept = int(valid.sum())
    if kept == 0 or kept > targets.numel() * (1 - _SKIP_FRACTION):
        return None
    return valid.nonzero().squeeze(1)


def _product_into(out: Tensor, a: Tensor, b: Tensor, packed_b: PackedOperand | None = None,
                  accumulate: bool = False) -> Tensor:
    """out (float32) = a @ b, or out += a @ b; a and b float32 or bf16 (accumulated in float32).
    packed_b: b packed for products of its number of rows (a shorter last block goes without)."""
    if packed_b is not None and not accumulate and packed_b.fits(a):
        return packed_b.product_into(a, out)
    if a.dtype == torch.float32:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    return out.add_(a @ b) if accumulate else out.copy_(a @ b)


def _block_rows(n: int, vocab: int, device: torch.device) -> int:
    """Rows of logits per block: a cache-sized block on a CPU, but never so few rows that the
    weight-gradient product (accumulated once per block over the whole (V, C) gradient) runs thin."""
    budget = _BLOCK_BYTES if device.type == "cpu" else _GPU_BLOCK_BYTES
    return max(_MIN_BLOCK_ROWS, budget // (vocab * 4))
