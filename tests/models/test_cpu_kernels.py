"""lmforge's C++ CPU kernels against torch's ops: the same numbers forward and backward."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops import kernels
from lmforge.ops.attention import kernel_attention as self_attention
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.ops.lm_loss import lm_head_cross_entropy

ops = kernels.ops()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


def reference_attention(qkv: torch.Tensor, n_head: int, causal: bool, lengths: torch.Tensor | None = None,
                        factors: torch.Tensor | None = None) -> torch.Tensor:
    """The attention written out: masked softmax, then the dropout factors, then v."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, C3 // 3 // n_head).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, nh, T, T)
    visible = torch.ones(T, T, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    if lengths is not None:
        visible = visible & (torch.arange(T) < lengths[:, None])[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    if factors is not None:
        probs = probs * factors.view(B, n_head, T, T)
    return (probs @ v).transpose(1, 2).reshape(B, T, C3 // 3)


CASES = [(1, 1, 8, 2), (2, 5, 8, 2), (3, 100, 48, 3), (2, 64, 32, 1), (1, 300, 64, 2)]


@needs_kernels
@pytest.mark.parametrize("B,T,C,n_head", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dropout_p,keep", [(0.0, False), (0.0, True), (0.3, False)])
def test_self_attention_matches_the_written_out_reference_in_float64(B, T, C, n_head, causal, padded, dropout_p,
                                                                      keep):
    """keep: the forward keeps its probabilities and the backward reads them instead of recomputing."""
    torch.manual_seed(T)
    seed = 1234
    lengths = torch.randint(1, T + 1, (B,)) if padded else None
    qkv64 = torch.randn(B, T, 3 * C, dtype=torch.float64, requires_grad=True)
    qkv = qkv64.detach().float()
    grad = torch.randn(B, T, C, dtype=torch.float64)
    factors = ops.attention_dropout_factors(B * n_head, T, dropout_p, seed).double() if dropout_p else None
    expected = reference_attention(qkv64, n_head, causal, lengths, factors)
    expected.backward(grad)
    probs = torch.empty(0) if keep else None
    out, lse = ops.self_attention(qkv, n_head, causal, lengths, dropout_p, seed, probs=probs)
    grad_qkv = ops.self_attention_backward(grad.float(), qkv, out, lse, n_head, causal, lengths, dropout_p, seed,
                                           probs=probs)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad_qkv.double(), qkv64.grad, atol=2e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (6, 1), (6, 3), (6, 2)])
@pytest.mark.parametrize("causal,padded,dropout_p,keep", [(True, False, 0.0, False), (True, False, 0.0, True),
                                                          (False, True, 0.0, True), (False, True, 0.3, False),
                                                          (True, True, 0.2, False)])
def test_grouped_heads_match_the_reference_on_repeated_heads(n_head, n_kv_head, causal, padded, dropout_p, keep):
    torch.manual_seed(n_head + n_kv_head)
    B, T, hs, seed = 2, 70, 8, 77
    lengths = torch.randint(1, T + 1, (B,)) if padded else None
    qkv64 = torch.randn(B, T, (n_head + 2 * n_kv_head) * hs, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv64.split((n_head * hs, n_kv_head * hs, n_kv_head * hs), dim=-1)
    k, v = (t.unflatten(-1, (n_kv_head, hs)).repeat_interleave(n_head // n_kv_head, dim=-2).flatten(-2)
            for t in (k, v))
    grad = torch.randn(B, T, n_head * hs, dtype=torch.float64)
    factors = ops.attention_dropout_factors(B * n_head, T, dropout_p, seed).double() if dropout_p else None
    expected = reference_attention(torch.cat((q, k, v), dim=-1), n_head, causal, lengths, factors)
    expected.backward(grad)
    qkv = qkv64.detach().float()
    probs = torch.empty(0) if keep else None
    out, lse = ops.self_attention(qkv, n_head, causal, lengths, dropout_p, seed, n_kv_head, probs=probs)
    grad_qkv = ops.self_attention_backward(grad.float(), qkv, out, lse, n_head, causal, lengths, dropout_p, seed,
                                           n_kv_head, probs=probs)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(grad_qkv.double(), qkv64.grad, atol=2e-5, rtol=1e-4)


@needs_kernels
def test_self_attention_through_autograd_and_padding_masks():
    torch.manual_seed(0)
    qkv = torch.randn(3, 20, 48, requires_grad=True)
    real = torch.ones(3, 20, dtype=torch.bool)
    real[1, 12:] = False
    real[2, 1:] = False
    out = self_attention(qkv, 2, causal=False, key_padding=real[:, None, None, :])
    out.backward(torch.ones_like(out))
    expected_qkv = qkv.detach().double().requires_grad_()
    expected = reference_attention(expected_qkv, 2, False, real.sum(1))
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), expected_qkv.grad, atol=2e-5, rtol=1e-4)
    left_padded = real.flip(1)
    assert self_attention(qkv, 2, causal=False, key_padding=left_padded) is None  # torch's masked path then


@needs_kernels
def test_attention_dropout_mask_drops_the_asked_share_independently():
    factors = ops.attention_dropout_factors(16, 256, 0.1, 7)
    kept = factors > 0
    assert factors.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.003)  # 1M draws: sd 0.0003
    rows = kept.float().mean(dim=-1)  # no row or column pattern
    assert rows.min() > 0.8 and rows.max() < 0.98
    assert (kept[:, 1:] == kept[:, :-1]).float().mean().item() == pytest.approx(0.82, abs=0.005)  # 0.9^2 + 0.1^2
    assert not torch.equal(kept, ops.attention_dropout_factors(16, 256, 0.1, 8) > 0)
    assert torch.equal(factors, ops.attention_dropout_factors(16, 256, 0.1, 7))


def test_gpt_with_dropout_is_reproducible_from_torch_seed():
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, context=40, dropout=0.2)
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        model = GPT(config).train()
        torch.manual_seed(seed)
        losses.append(model(tokens[:, :-1], targets=tokens[:, 1:])[0].item())
    assert losses[0] == losses[1] != losses[2]


@needs_kernels
def test_self_attention_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.self_attention(torch.zeros(2, 4, 24, dtype=torch.float64), 2, True, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="not a multiple of n_head \\+ 2 n_kv_head"):
        ops.self_attention(torch.zeros(2, 4, 24), 5, True, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        ops.self_attention(torch.zeros(2, 4, 24), 2, True, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="one entry per batch row"):
        ops.self_attention(torch.zeros(2, 4, 24), 2, False, torch.tensor([4]), 0.0, 0)
    with pytest.raises(RuntimeError, match="kept only without dropout"):
        ops.self_attention(torch.zeros(2, 4, 24), 2, True, None, 0.1, 0, probs=torch.empty(0))
    qkv, kept = torch.zeros(2, 4, 24), torch.empty(0)
    out, lse = ops.self_attention(qkv, 2, True, None, 0.0, 0, probs=kept)
    with pytest.raises(RuntimeError, match="not what the forward kept"):
        ops.self_attention_backward(out, qkv, out, lse, 2, True, None, 0.0, 0, probs=kept[1:])


def test_self_attention_declines_what_it_does_not_cover():
    assert self_attention(torch.zeros(1, 4, 24, dtype=torch.bfloat16), 2, causal=True) is None
    assert self_attention(torch.zeros(1, 4, 24, dtype=torch.float64), 2, causal=True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert self_attention(torch.zeros(1, 4, 24), 2, causal=True) is None


def test_gpt_gives_the_same_loss_and_gradients_with_and_without_kernels(monkeypatch):
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, context=80)
    tokens = torch.randint(0, 97, (3, 71), generator=torch.Generator().manual_seed(0))
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        torch.manual_seed(0)
        model = GPT(config)
        loss_sum, correct, counted = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, [p.grad for p in model.parameters()]))
    (loss_a, correct_a, grads_a), (loss_b, correct_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-4)
    assert correct_a == correct_b
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("subtract_target", [False, True])
def test_softmax_rows_matches_torch(subtract_target):
    torch.manual_seed(1)
    logits = torch.randn(37, 1001) * 30
    targets = torch.randint(0, 1001, (37,))
    expected_max = logits.amax(dim=1)
    expected_exp = (logits - expected_max[:, None]).exp()
    expected_sum = expected_exp.sum(dim=1)
    target_logit, row_max, sum_exp = torch.empty(37), torch.empty(37), torch.empty(37)
    expected_target = logits.gather(1, targets[:, None]).squeeze(1)
    ops.softmax_rows_(logits, targets, target_logit, row_max, sum_exp, subtract_target)
    torch.testing.assert_close(target_logit, expected_target)
    torch.testing.assert_close(row_max, expected_max)
    torch.testing.assert_close(sum_exp, expected_sum, rtol=1e-5, atol=0)
    if subtract_target:  # E - sum onehot: scaled by 1 / sum, the logits' gradient softmax - onehot
        expected_exp[torch.arange(37), targets] -= expected_sum
    torch.testing.assert_close(logits, expected_exp, rtol=2e-6, atol=1e-30 if not subtract_target else 1e-5)


@needs_kernels
def test_softmax_rows_names_a_target_outside_the_vocabulary():
    with pytest.raises(RuntimeError, match="target 12 is outside the vocabulary of 10"):
        ops.softmax_rows_(torch.zeros(2, 10), torch.tensor([3, 12]), torch.empty(2), torch.empty(2), torch.empty(2))


def test_fused_output_layer_is_the_same_with_and_without_the_row_pass(monkeypatch):
    torch.manual_seed(2)
    hidden, weight = torch.randn(600, 16), torch.randn(300, 16)
    targets = torch.randint(0, 300, (600,))
    targets[::7] = -100
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_sum, correct, counted = lm_head_cross_entropy(h, w, targets)
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, counted, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is None
    assert kernels.unavailable_reason() == "LMFORGE_CPU_KERNELS=0"


def test_a_failed_build_falls_back_and_is_not_retried_by_later_runs(monkeypatch, tmp_path, capsys):
    builds = []

    def no_compiler(name, folder):
        builds.append(folder)
        raise RuntimeError("Error building extension\nNinja is required to load C++ extensions")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_build", no_compiler)
    for _ in range(2):  # a second process finds the reason left by the first
        monkeypatch.setattr(kernels, "_state", {})
        assert kernels.ops() is None
        assert "Ninja is required to load C++ extensions" in kernels.unavailable_reason()
        assert str(tmp_path) in kernels.unavailable_reason()
    assert len(builds) == 1
    assert "CPU kernels unavailable, using torch's" in capsys.readouterr().err


@needs_kernels
def test_a_damaged_library_is_built_again_not_loaded(monkeypatch, tmp_path):
    builds, loads = [], []

    def fake_build(name, folder):
        builds.append(name)
        (folder / f"{name}.so").write_bytes(b"a whole library")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_build", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is not None and len(builds) == 1
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is not None and len(builds) == 1  # whole: loaded as it is
    library = kernels.build_dir() / f"{builds[0]}.so"
    library.write_bytes(b"a half")  # as a build killed while linking leaves it
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is not None and len(builds) == 2
    assert loads == [str(library)] * 3


def test_bert_gives_the_same_outputs_and_gradients_with_and_without_kernels(monkeypatch):
    ids = torch.randint(0, 97, (3, 18), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 18, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        torch.manual_seed(0)
        model = Bert(BertConfig(vocab_size=97, context=24, n_layer=2, n_head=2, n_embd=16, dropout=0.0))
        mlm, nsp = model(ids, mask, types)
        (mlm[mask.bool()].logsumexp(-1).sum() + nsp.sum()).backward()
        results.append((mlm[mask.bool()].detach(), nsp.detach(), [p.grad for p in model.parameters()]))
    (mlm_a, nsp_a, grads_a), (mlm_b, nsp_b, grads_b) = results
    torch.testing.assert_close(mlm_a, mlm_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nsp_a, nsp_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

