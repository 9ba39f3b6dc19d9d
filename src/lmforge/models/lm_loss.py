"""The output projection and next-token cross-entropy of a GPT, fused on the fp32 path.

Unfused, the (N, V) logits of a step make many passes through memory: the projection writes
them, `F.cross_entropy` writes a log-softmax as large, its backward allocates and zero-fills a
gradient and writes it again, and accuracy reads them once more for the row maximum. On the
GPT workload (2,048 x 8,192 logits, 64 MiB each) that was 10% of a CPU training step.

Fused, the forward turns the logits buffer into exp(logits - row max) a cache-sized block of
rows at a time (row max, sum of exponentials, target logit; the max also decides accuracy),
and the backward never forms the gradient of the logits: with G = diag(s) E - onehot * w,
G @ W = s * (E @ W) - w * W[targets] and G^T @ H = E^T @ (s * H) - onehot^T (w * H), so the two
backward matrix products read E directly and the rest is (N, C)-sized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge.metrics import IGNORE_INDEX, count_correct

_BLOCK_BYTES = 4 << 20  # ~4 MiB of logits per block stays in cache between its passes


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_sum, correct, counted) of logits hidden @ weight.T against targets; -100 is ignored.

    hidden (N, C), weight (V, C), targets (N,). loss_sum is the summed cross-entropy
    (differentiable in hidden and weight), correct counts the rows whose target logit is the
    row maximum (argmax accuracy barring exact ties), counted the targets that are not -100.
    The fused path runs for float32 outside autocast and torch.compile; otherwise the plain
    one (projection, then `F.cross_entropy`) gives the same numbers.
    """
    fused = (hidden.dtype == torch.float32 and weight.dtype == torch.float32
             and not torch.is_autocast_enabled(hidden.device.type) and not torch.compiler.is_compiling())
    if fused:
        return _LMHeadCrossEntropy.apply(hidden, weight, targets)
    logits = F.linear(hidden, weight).float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct, counted = count_correct(logits, targets)
    return loss_sum, correct, counted


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        exp = hidden @ weight.t()  # (N, V) logits, made exp(logits - row max) in place below
        valid = targets != IGNORE_INDEX
        index = targets.clamp(min=0)
        target_logit = exp.gather(1, index[:, None]).squeeze(1)  # (N,)
        row_max = torch.empty_like(target_logit)
        sum_exp = torch.empty_like(target_logit)
        rows = _block_rows(exp)
        for start in range(0, exp.shape[0], rows):
            block = exp[start:start + rows]
            peak = block.amax(dim=1)
            row_max[start:start + rows] = peak
            sum_exp[start:start + rows] = block.sub_(peak[:, None]).exp_().sum(dim=1)
        loss_sum = torch.where(valid, sum_exp.log() + row_max - target_logit, 0.0).sum()
        correct = ((target_logit >= row_max) & valid).sum()
        counted = valid.sum()
        ctx.save_for_backward(hidden, weight, exp, sum_exp, index, valid)
        ctx.mark_non_differentiable(correct, counted)
        return loss_sum, correct, counted

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _correct, _counted) -> tuple[Tensor | None, Tensor | None, None]:
        hidden, weight, exp, sum_exp, index, valid = ctx.saved_tensors
        w = torch.where(valid, grad_loss, 0.0)[:, None]  # (N, 1): d loss / d loss_sum on counted rows
        scale = w / sum_exp[:, None]  # (N, 1): softmax = exp * scale / w
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (exp @ weight).mul_(scale).sub_(w * weight[index])  # (N, C)
        if ctx.needs_input_grad[1]:
            grad_weight = exp.t() @ (hidden * scale)  # (V, C), laid out like the weight
            grad_weight.index_add_(0, index, hidden * -w)
        return grad_hidden, grad_weight, None


def _block_rows(logits: Tensor) -> int:
    if logits.device.type != "cpu":
        return logits.shape[0]  # GPU memory bandwidth is not the limit; one launch per op
    return max(1, _BLOCK_BYTES // (logits.shape[1] * logits.element_size()))
