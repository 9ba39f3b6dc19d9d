import pytest
import torch
import torch.nn.functional as F

from lmforge.base.metrics import IGNORE_INDEX
from lmforge.ops import lm_loss


def _case(rows=300, width=24, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=g)
    weight = torch.randn(vocab, width, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = IGNORE_INDEX
    right = rows // 2 + 1
    targets[right] = int((hidden[right] @ weight.t()).argmax())  # at least one right answer
    return hidden, weight, targets


def _reference(hidden, weight, targets):
    logits = hidden @ weight.t()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = targets != IGNORE_INDEX
    return loss_sum, int(((logits.argmax(1) == targets) & valid).sum()), int(valid.sum())


@pytest.mark.parametrize("block_rows", [512, 64])  # one block; many blocks with a short last one
def test_fused_matches_projection_then_cross_entropy(monkeypatch, block_rows):
    monkeypatch.setattr(lm_loss, "_MIN_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(lm_loss, "_BLOCK_BYTES", 1000)
    hidden, weight, targets = _case()
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss_sum, correct, counted = lm_loss.lm_head_cross_entropy(*ours, targets)
    (loss_sum * 0.5).backward()
    ref_loss, ref_correct, ref_counted = _reference(*theirs, targets)
    (ref_loss * 0.5).backward()
    assert loss_sum.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert (correct.item(), counted.item()) == (ref_correct, ref_counted) and ref_correct >= 1
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert ours[0].grad[::5].abs().max() == 0  # ignored rows get no gradient


def test_all_ignored_no_grad_and_one_input_frozen():
    hidden, weight, _ = _case(rows=4)
    targets = torch.full((4,), IGNORE_INDEX)
    h = hidden.clone().requires_grad_()
    loss_sum, correct, counted = lm_loss.lm_head_cross_entropy(h, weight, targets)  # weight frozen
    loss_sum.backward()
    assert (loss_sum.item(), correct.item(), counted.item()) == (0.0, 0, 0)
    assert h.grad.abs().max() == 0
    hidden, weight, targets = _case()
    with torch.no_grad():
        loss_sum, _, _ = lm_loss.lm_head_cross_entropy(hidden, weight, targets)
    assert loss_sum.item() == pytest.approx(_reference(hidden, weight, targets)[0].item(), rel=1e-6)


def test_bf16_autocast_matches_autocast_projection_then_cross_entropy():
    hidden, weight, targets = _case(vocab=389)
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, correct, counted = lm_loss.lm_head_cross_entropy(*ours, targets)
        logits = F.linear(*theirs)  # bf16, as autocast runs it
        ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    loss_sum.backward()
    ref.backward()
    valid = targets != IGNORE_INDEX
    assert logits.dtype == torch.bfloat16 and loss_sum.dtype == torch.float32
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)  # same bf16 logits, float32 softmax
    assert correct.item() == int(((logits.float().argmax(1) == targets) & valid).sum())
    assert counted.item() == int(valid.sum())
    for mine, ref_param in zip(ours, theirs):
        assert mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, ref_param.grad, rtol=0.05, atol=0.02 * float(ref_param.grad.abs().max()))


def test_fp16_autocast_takes_the_plain_path():
    hidden, weight, targets = _case()
    with torch.autocast("cpu", dtype=torch.float16):
        loss_sum, _, counted = lm_loss.lm_head_cross_entropy(hidden, weight, targets)
    assert loss_sum.dtype == torch.float32 and counted.item() == int((targets != IGNORE_INDEX).sum())
    assert loss_sum.item() == pytest.approx(_reference(hidden, weight, targets)[0].item(), rel=2e-2)


def test_a_second_backward_with_retain_graph_gives_the_same_gradient():
    hidden, weight, targets = _case()
    h = hidden.clone().requires_grad_()
    loss_sum, _, _ = lm_loss.lm_head_cross_entropy(h, weight, targets)
    first = torch.autograd.grad(loss_sum, h, retain_graph=True)[0]
    second = torch.autograd.grad(loss_sum, h)[0]
    assert torch.equal(first, second)


def test_gradients_are_computed_only_when_autograd_will_ask_for_them(monkeypatch):
    products = []
    real = lm_loss._product_into
    monkeypatch.setattr(lm_loss, "_product_into", lambda out, *args, **kw: products.append(out.shape) or
                        real(out, *args, **kw))
    hidden, weight, targets = _case()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        lm_loss.lm_head_cross_entropy(h, w, targets)
    assert products == []  # evaluation: the logits only
    lm_loss.lm_head_cross_entropy(h, weight, targets)[0].backward()  # frozen weight: no weight gradient
    assert products == [(int((targets != IGNORE_INDEX).sum()), hidden.shape[1])] and w.grad is None


@pytest.mark.parametrize("ignored, projected", [(60, 240), (1, 300), (300, 300)])
def test_rows_without_a_target_are_left_out_once_enough_are(monkeypatch, ignored, projected):
    """Prompts and padding cost no output-layer work; a few ignored rows (the last position of
    each pretraining row) or none to learn (all ignored) keep the plain path."""
    seen = []
    real = lm_loss._LMHeadCrossEntropy.apply
    monkeypatch.setattr(lm_loss._LMHeadCrossEntropy, "apply", lambda h, *a: seen.append(len(h)) or real(h, *a))
    hidden, weight, _ = _case()
    targets = torch.randint(0, weight.shape[0], (300,), generator=torch.Generator().manual_seed(1))
    targets[torch.randperm(300, generator=torch.Generator().manual_seed(2))[:ignored]] = IGNORE_INDEX
    h = hidden.clone().requires_grad_()
    loss_sum, correct, counted = lm_loss.lm_head_cross_entropy(h, weight, targets)
    loss_sum.backward()
    assert seen == [projected]
    ref = hidden.clone().requires_grad_()
    ref_loss, ref_correct, ref_counted = _reference(ref, weight, targets)
    ref_loss.backward()
    assert loss_sum.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
    assert (correct.item(), counted.item()) == (ref_correct, ref_counted)
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-6)
