"""A weight packed once for several products: the same products as plain ones, refused where
the operands do not fit the packing, and the fused output layer's blocks through it."""

from __future__ import annotations

import pytest
import torch

from lmforge.base.metrics import IGNORE_INDEX
from lmforge.ops import kernels, lm_loss, packed

library = kernels.ops()
pytestmark = pytest.mark.skipif(library is None or not library.has_packed_products(),
                                reason=f"packed products unavailable: {kernels.unavailable_reason()}")


@pytest.mark.parametrize("transposed", [True, False])
def test_a_packed_operand_gives_the_plain_product_for_every_block(transposed):
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    right = w.t() if transposed else w
    operand = packed.right_operand(w, transposed=transposed, rows=16, uses=3)
    for _ in range(3):
        a = torch.randn(16, right.shape[0])
        out = torch.empty(16, right.shape[1])
        assert operand.fits(a) and operand.product_into(a, out) is out
        torch.testing.assert_close(out, a @ right, rtol=1e-5, atol=1e-5)


def test_products_that_do_not_fit_the_packing_are_refused():
    w = torch.randn(96, 40)
    operand = packed.right_operand(w, transposed=True, rows=16, uses=2)
    assert not operand.fits(torch.randn(15, 40))
    with pytest.raises(RuntimeError, match=r"a must be \(16, 40\) and out \(16, 96\)"):
        operand.product_into(torch.randn(15, 40), torch.empty(15, 96))
    with pytest.raises(RuntimeError, match="out"):
        operand.product_into(torch.randn(16, 40), torch.empty(16, 95))
    with pytest.raises(RuntimeError, match="must come from pack_right_operand"):
        library.packed_product_out(torch.randn(16, 40), torch.empty(4), torch.empty(16, 96))
    forged = torch.zeros(32)  # a header that names (16, 96, 40) over too short a buffer
    forged[:6].view(torch.int64)[:] = torch.tensor([16, 96, 40])
    with pytest.raises(RuntimeError, match="must come from pack_right_operand"):
        library.packed_product_out(torch.randn(16, 40), forged, torch.empty(16, 96))
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        library.pack_right_operand(w.double(), True, 16)


def test_packing_is_left_out_where_it_does_not_pay_or_cannot_be_had(monkeypatch):
    w = torch.randn(96, 40)
    assert packed.right_operand(w, transposed=True, rows=16, uses=1) is None  # one product: no reuse
    assert packed.right_operand(w.double(), transposed=True, rows=16, uses=4) is None
    assert packed.right_operand(w.t(), transposed=False, rows=16, uses=4) is None  # rows not contiguous
    monkeypatch.setattr(kernels, "ops", lambda **_: None)
    assert packed.right_operand(w, transposed=True, rows=16, uses=4) is None


def test_the_fused_output_layer_takes_its_full_blocks_through_the_packed_weight(monkeypatch):
    monkeypatch.setattr(lm_loss, "_MIN_BLOCK_ROWS", 64)  # 300 rows with targets: 4 blocks of 64 and one of 44
    monkeypatch.setattr(lm_loss, "_BLOCK_BYTES", 1000)
    calls = []
    real = packed.PackedOperand.product_into
    monkeypatch.setattr(packed.PackedOperand, "product_into",
                        lambda self, a, out: calls.append(a.shape) or real(self, a, out))
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(300, 24, generator=g), torch.randn(97, 24, generator=g)
    targets = torch.randint(0, 97, (300,), generator=g)
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss_sum, _, _ = lm_loss.lm_head_cross_entropy(*ours, targets)
    loss_sum.backward()
    ref = torch.nn.functional.cross_entropy(theirs[0] @ theirs[1].t(), targets, ignore_index=IGNORE_INDEX,
                                            reduction="sum")
    ref.backward()
    assert calls == [torch.Size([64, 24]), torch.Size([64, 97])] * 4  # logits and input gradient per full block
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, expected.grad, rtol=1e-5, atol=1e-6)
