"""The GPT decode step's C++ attention (`decode_attention_masked`, through `ops.attention.attend`)
against torch's path: the same outputs and cache contents for one row or many, with and without
a mask over each row's columns; a masked key gets no weight at all; whole decode steps (the
single-sequence `Decoder` and the serving engine's batched rows at different positions) give
the logits they give without the kernels."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.inference.batch_decode import BatchDecoder
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models import gpt_decode
from lmforge.models.gpt_decode import Decoder
from lmforge.ops import kernels
from lmforge.ops.attention import attend
from lmforge.ops.decode import decode_attention

ops = kernels.ops()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


def _owned(B: int, keys: int, seed: int) -> torch.Tensor:
    """(B, 1, 1, keys) booleans: random columns of each row, its own new (last) column always."""
    owned = torch.rand(B, 1, 1, keys, generator=torch.Generator().manual_seed(seed)) < 0.6
    owned[..., -1] = True
    return owned


def _additive(owned: torch.Tensor) -> torch.Tensor:
    return torch.zeros(owned.shape).masked_fill_(~owned, -math.inf)


def _with_and_without_kernels(run, monkeypatch, *, python_block_fails: bool = False):
    """(run() with lmforge's kernels, run() with torch's ops). python_block_fails: the kernels' run
    fails where a decode step falls back to Python's block instead of the one C++ call."""
    results = []
    for available in (True, False):
        with monkeypatch.context() as patch:
            if not available:
                patch.setitem(kernels._state, "ops", None)
            elif python_block_fails:
                patch.setattr(gpt_decode, "block", _python_block_called)
            results.append(run())
    return results


def _python_block_called(*args, **kwargs):
    raise AssertionError("the decode step ran Python's block, not the kernel")


@needs_kernels
@pytest.mark.parametrize("B,nh,hs", [(1, 4, 8), (3, 2, 16), (5, 3, 10)])
@pytest.mark.parametrize("start", [0, 7])
@pytest.mark.parametrize("masked", ["none", "additive", "boolean"])
def test_kernel_writes_the_cache_and_attends_as_the_torch_path(B, nh, hs, start, masked, monkeypatch):
    torch.manual_seed(start + B)
    L = 12
    caches = torch.randn(2, B, nh, L, hs)
    qkv = torch.randn(B, 3 * nh * hs)
    owned = _owned(B, start + 1, seed=start)
    mask = {"none": None, "additive": _additive(owned), "boolean": owned}[masked]

    def run():
        k, v = caches.clone()
        with torch.no_grad():
            used = decode_attention(qkv, nh, (k.clone(), v.clone()), start, mask) is not None
            return attend(qkv, nh, causal=False, attn_mask=mask, kv=(k, v), start=start), k, v, used

    results = _with_and_without_kernels(run, monkeypatch)
    assert results[0][3] and not results[1][3]  # the kernel made the first numbers, torch the second
    results = [r[:3] for r in results]
    (y, k, v), (y_ref, k_ref, v_ref) = results
    assert y.shape == (B, nh * hs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)  # the new column written, nothing else touched
    torch.testing.assert_close(k[:, :, start], qkv[:, nh * hs:2 * nh * hs].view(B, nh, hs), atol=0, rtol=0)


@needs_kernels
def test_a_masked_key_gets_no_weight_at_all():
    """Values of huge size behind the mask would show through any weight the softmax left them."""
    B, nh, hs, start, L = 2, 2, 8, 5, 8
    torch.manual_seed(3)
    k, v = torch.randn(2, B, nh, L, hs)
    owned = _owned(B, start + 1, seed=4)
    owned[0, ..., 0] = False
    v[:, :, :start + 1][~owned.view(B, 1, start + 1).expand(B, nh, start + 1)] = 1e30
    qkv = torch.randn(B, 3 * nh * hs)
    with torch.no_grad():
        y = decode_attention(qkv, nh, (k, v), start, _additive(owned)).view(B, nh, hs)
    q = qkv[:, :nh * hs].view(B, nh, hs)
    for b in range(B):
        seen = owned[b].flatten().nonzero().flatten()  # the row's visible columns
        weights = torch.softmax(torch.einsum("hd,htd->ht", q[b], k[b][:, seen]) / math.sqrt(hs), dim=-1)
        torch.testing.assert_close(y[b], torch.einsum("ht,htd->hd", weights, v[b][:, seen]), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_a_rows_hidden_leading_columns_are_not_read():
    """A serving batch's timeline is wider than a row's own columns (the kernel skips the hidden
    ones before a row's first visible column): whatever the hidden columns hold, NaN included, the
    row's numbers are the same bits."""
    B, nh, hs, start, L = 3, 2, 8, 9, 12
    torch.manual_seed(5)
    k, v = torch.randn(2, B, nh, L, hs)
    mask = torch.zeros(B, start + 1)
    mask[0, :6] = -math.inf  # row 0 owns columns 6 .. 9
    mask[1, :2] = -math.inf  # row 1 owns columns 2, 4 .. 9 (a hole after its prefix)
    mask[1, 3] = -math.inf
    qkv = torch.randn(B, 3 * nh * hs)
    outputs = []
    for fill in (float("nan"), 1e30):
        k_run, v_run = k.clone(), v.clone()
        k_run[0, :, :6], v_run[0, :, :6] = fill, fill
        k_run[1, :, :2], v_run[1, :, :2] = fill, fill
        with torch.no_grad():
            outputs.append(decode_attention(qkv, nh, (k_run, v_run), start, mask))
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])


@needs_kernels
def test_kernel_refuses_a_position_outside_the_cache_and_a_mask_of_another_size():
    k, v = torch.zeros(2, 2, 2, 4, 8)  # (B, nh, max_len, hs) each
    qkv = torch.randn(2, 3 * 2 * 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.decode_attention_masked(qkv, None, None, None, k, v, 4, 2)
    with pytest.raises(RuntimeError, match="mask must hold"):
        ops.decode_attention_masked(qkv, None, None, torch.zeros(2, 3), k, v, 3, 2)
    with torch.no_grad():  # one mask row for the whole batch: torch's path broadcasts it, not the kernel
        assert decode_attention(qkv, 2, (k, v), 3, torch.zeros(1, 1, 1, 4)) is None
        assert decode_attention(qkv, 2, (k, v), 3, torch.zeros(2, 1, 1, 4)) is not None


def _model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=67, context=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**{**cfg, **overrides})).eval()
    for p in model.parameters():  # non-zero biases and norms: every term of the step counts
        torch.nn.init.normal_(p, std=0.2)
    return model


@needs_kernels
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_new", False), ("relu", True)])
def test_decoder_logits_with_and_without_kernels_agree(activation, bias, monkeypatch):
    model = _model(activation=activation, bias=bias)
    ids = torch.randint(0, 67, (2, 12), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.inference_mode():
            cache = model.new_kv_cache(2, 16)
            model(ids[:, :4], kv_cache=cache)
            decoder = Decoder(model)
            logits = torch.cat([decoder.step(ids[:, t:t + 1], cache) for t in range(4, 12)], dim=1)
        return logits, cache.k, cache.v

    runs = _with_and_without_kernels(run, monkeypatch, python_block_fails=True)
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        full = model(ids)  # the cache-free forward, which no decode kernel touches
    torch.testing.assert_close(runs[0][0], full[:, 4:], atol=1e-5, rtol=1e-5)


def _batched_logits(model: GPT, prompts: list[list[int]], feed: list[list[int]]) -> list[torch.Tensor]:
    """Rows joining at different steps (so at different positions, owning different columns):
    every row's logits, step by step."""
    decoder = BatchDecoder(model, slots=len(prompts))
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    with torch.inference_mode():
        for step in range(len(feed[0])):
            if step < len(prompts):
                out[step].append(decoder.add(step, prompts[step]))
            rows = list(decoder.owners)
            logits = decoder.step([feed[i][len(out[i]) - 1] for i in rows])
            for i, row in zip(rows, logits):
                out[i].append(row)
    return [torch.stack(o) for o in out]


@needs_kernels
def test_batched_rows_at_different_positions_equal_each_row_alone_and_the_torch_path(monkeypatch):
    model = _model()
    prompts = [[5, 9, 2], [7, 1, 1, 3, 30, 8, 4], [11], [3, 3]]
    feed = [list(range(10 + i, 19 + i)) for i in range(4)]
    with_kernels, without = _with_and_without_kernels(lambda: _batched_logits(model, prompts, feed), monkeypatch)
    for got, want in zip(with_kernels, without):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i, prompt in enumerate(prompts):  # the row alone, through the single-sequence decoder
        with torch.inference_mode():
            cache = model.new_kv_cache(1, 32)
            alone = [model(torch.tensor([prompt]), kv_cache=cache)[0, -1]]
            decoder = Decoder(model)
            alone += [decoder.step(torch.tensor([[t]]), cache)[0, 0] for t in feed[i][:len(with_kernels[i]) - 1]]
        torch.testing.assert_close(with_kernels[i], torch.stack(alone), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("nh,nkv,hs", [(4, 2, 8), (6, 1, 10)])
def test_the_same_call_turns_grouped_heads_with_each_rows_angles_under_a_mask(nh, nkv, hs, monkeypatch):
    """A Llama's batched step (GQA, rotary angles per row, rows owning different columns) is the
    general case of the call: against torch's grouped path with the same mask."""
    from lmforge.ops.grouped_attention import attend_projected
    from lmforge.ops.rotary import RopeTables

    torch.manual_seed(nh)
    B, L, start = 3, 10, 6
    caches = torch.randn(2, B, nkv, L, hs)
    qkv = torch.randn(B, (nh + 2 * nkv) * hs)
    cos, sin = (t[torch.tensor([2, 7, 4])] for t in RopeTables(hs, 10000.0, None, 16).get(
        torch.device("cpu"), torch.float32, 16))  # (B, hs): each row at its own position
    mask = _additive(_owned(B, start + 1, seed=nkv))
    k, v = caches.clone()
    with torch.no_grad():
        y = decode_attention(qkv, nh, (k, v), start, mask, rope=(cos, sin))
    monkeypatch.setitem(kernels._state, "ops", None)
    k_ref, v_ref = caches.clone()
    with torch.no_grad():
        y_ref = attend_projected(qkv, (cos.unsqueeze(-2), sin.unsqueeze(-2)), nh, nkv, hs, causal=False,
                                 attn_mask=mask, kv=(k_ref, v_ref), start=start)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(v, v_ref)


@needs_kernels
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_new", False), ("relu", True)])
@pytest.mark.parametrize("start,masked", [(0, False), (3, True)])
def test_a_prefill_block_in_one_call_is_the_forwards_block_bit_for_bit(activation, bias, start, masked, monkeypatch):
    from lmforge.models.gpt import block
    from lmforge.models.gpt_decode import prefill_block

    model = _model(activation=activation, bias=bias)
    parts = model.transformer.h[0].parts()
    B, T = 2, 5
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(start))
    caches = torch.randn(2, B, 4, 16, 8, generator=torch.Generator().manual_seed(9))
    mask = None
    if masked:  # each row sees its own earlier columns, causally among the new ones
        mask = torch.ones(B, 1, T, start + T, dtype=torch.bool).tril(start)
        mask[1, :, :, 0] = False
    with torch.inference_mode(), monkeypatch.context() as patch:
        patch.setattr(gpt_decode, "block", _python_block_called)  # the C++ call, not Python's block
        k, v = caches.clone()
        got = prefill_block(x, parts, mask, not masked, (k, v), start)
    with torch.inference_mode():
        k_ref, v_ref = caches.clone()
        want = block(x, parts, mask, not masked, (k_ref, v_ref), start)
    assert torch.equal(got, want) and torch.equal(k, k_ref) and torch.equal(v, v_ref)
