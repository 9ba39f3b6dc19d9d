"""The whole-model decode step of a few rows (`gpt_decode.rows_step`, C++ `decode_gpt_rows`):
its logits and cache writes equal the forward's up to float rounding for every activation, with
and without biases and masks; each row's numbers are the same bits whichever rows share its
step; it declines what it does not run, and the C++ side refuses ids outside the embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.inference.batch_decode import BatchDecoder
from lmforge.models.gpt import GPT
from lmforge.models.gpt_decode import KERNEL_ROWS, Decoder, rows_step
from lmforge.ops import kernels
from lmforge.ops.lora import LoRALinear

from test_gpt_decode_kernel import _model  # non-zero biases and norms: every term of the step counts

ops = kernels.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


def _prefilled(model: GPT, prompts: torch.Tensor):
    cache = model.new_kv_cache(prompts.shape[0])
    with torch.inference_mode():
        model(prompts, kv_cache=cache)
    return cache


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_new", True), ("relu", False), ("gelu", False)])
def test_rows_step_equals_the_forward_to_float_rounding(activation, bias):
    model = _model(activation=activation, bias=bias, intermediate_size=48)
    ids = torch.randint(0, 67, (3, 10), generator=torch.Generator().manual_seed(1))
    ref, ours = _prefilled(model, ids[:, :4]), _prefilled(model, ids[:, :4])
    decoder = Decoder(model)
    with torch.inference_mode():
        for t in range(4, 10):
            expected = model(ids[:, t:t + 1], kv_cache=ref)[:, 0]  # (3, V)
            got = rows_step(decoder, ids[:, t], torch.full((3,), t), None, ours.k, ours.v, t)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(ours.k[:, :, :, :10], ref.k[:, :, :, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.v[:, :, :, :10], ref.v[:, :, :, :10], atol=1e-5, rtol=1e-5)


def test_a_masked_column_is_ignored_and_rows_keep_their_own_positions():
    """Rows at different positions owning different columns: each row's logits are those of its
    own tokens alone (the forward on the row's visible history)."""
    model = _model()
    decoder = Decoder(model)
    torch.manual_seed(2)
    histories = [torch.randint(0, 67, (n,)) for n in (5, 2)]
    cache = model.new_kv_cache(2, 8)
    owned = torch.zeros(2, 8, dtype=torch.bool)
    columns = [[0, 2, 3, 4, 5], [1, 6]]  # each row's tokens sit in these columns, new token next at 7
    with torch.inference_mode():
        for row, (tokens, cols) in enumerate(zip(histories, columns)):
            alone = model.new_kv_cache(1, 8)
            model(tokens[None], kv_cache=alone)
            for layer in range(2):
                cache.k[layer, row][:, cols] = alone.k[layer, 0][:, :len(cols)]
                cache.v[layer, row][:, cols] = alone.v[layer, 0][:, :len(cols)]
            owned[row, cols] = True
        owned[:, 7] = True
        mask = torch.zeros(2, 1, 1, 8).masked_fill_(~owned[:, None, None], -math.inf)
        cache.k[:, :, :, ~owned.any(0)] = 1e30  # a column nobody owns: any weight on it would show
        new = torch.tensor([9, 4])
        got = rows_step(decoder, new, torch.tensor([5, 2]), mask, cache.k, cache.v, 7)
        for row, tokens in enumerate(histories):
            want = model(torch.cat([tokens, new[row:row + 1]])[None])[0, -1]
            torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)


def test_each_rows_numbers_do_not_depend_on_the_rows_beside_it():
    model = _model()
    decoder = Decoder(model)
    torch.manual_seed(3)
    filled = model.new_kv_cache(KERNEL_ROWS)
    filled.k.normal_(), filled.v.normal_()  # five columns of history per row
    ids = torch.randint(0, 67, (KERNEL_ROWS,))
    with torch.inference_mode():
        results = {}
        for rows in (1, 3, 4, 7, KERNEL_ROWS):
            k, v = filled.k.clone(), filled.v.clone()
            results[rows] = rows_step(decoder, ids[:rows], torch.full((rows,), 5), None, k, v, 5)
    for rows, logits in results.items():
        assert torch.equal(logits[0], results[1][0])
        assert rows < 3 or torch.equal(logits[:3], results[3])


def test_rows_step_declines_what_it_does_not_run(monkeypatch):
    model = _model()
    cache = model.new_kv_cache(KERNEL_ROWS + 1)
    with torch.inference_mode():
        wide = torch.zeros(KERNEL_ROWS + 1, dtype=torch.long)
        assert rows_step(Decoder(model), wide, wide, None, cache.k, cache.v, 0) is None  # the BLAS's width
        one = torch.zeros(1, dtype=torch.long)
        small = model.new_kv_cache(1)
        assert rows_step(Decoder(model), one, one, torch.zeros(1, 1, 1, 3), small.k, small.v, 0) is None  # mask size
        assert rows_step(Decoder(model), one, one, None, small.k, small.v, 0) is not None
    with torch.no_grad():
        assert rows_step(Decoder(model), one, one, None, small.k, small.v, 0) is not None
    adapted = _model()
    attn = adapted.transformer.h[0].attn
    attn.c_attn = LoRALinear(attn.c_attn, 2, 4.0)
    assert Decoder(adapted.eval()).kernel_parts is None  # adapters: the block-by-block step
    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setitem(kernels._state, "ops", None)
        assert rows_step(Decoder(model), one, one, None, small.k, small.v, 0) is None


def test_the_kernel_refuses_ids_and_positions_outside_the_embeddings():
    model = _model()
    decoder = Decoder(model)
    cache = model.new_kv_cache(1)
    tensors, code = decoder.kernel_parts

    def call(token: int, position: int):
        return ops.decode_gpt_rows(torch.tensor([token]), torch.tensor([position]), decoder.wte, decoder.wpe, tensors,
                                   *decoder.ln_f, decoder.lm_head, None, cache.k, cache.v, 0, 4, decoder.eps, code)

    with torch.inference_mode():
        assert call(66, 31).shape == (1, 67)
        for token, position in ((67, 0), (-1, 0), (0, 32)):
            with pytest.raises(RuntimeError, match="outside the embeddings"):
                call(token, position)


def test_the_kernel_refuses_slots_columns_and_logit_rows_outside_their_ranges():
    model = _model()
    decoder = Decoder(model)
    cache = model.new_kv_cache(2)
    tensors, code = decoder.kernel_parts
    ids = torch.tensor([3, 4, 5])

    def call(slots, columns, logit_rows):
        joined = [torch.tensor(x) for x in (slots, columns, logit_rows)]
        return ops.decode_gpt_rows(ids, torch.tensor([2, 0, 1]), decoder.wte, decoder.wpe, tensors, *decoder.ln_f,
                                   decoder.lm_head, None, cache.k, cache.v, 2, 4, decoder.eps, code, *joined)

    with torch.inference_mode():
        assert call([0, 1, 1], [2, 1, 2], [0, 2]).shape == (2, 67)  # a prompt of two positions in row 1
        for args, what in ((([0, 2, 1], [2, 1, 2], [0]), "slots 2 at 1"), (([0, 1, 1], [2, 1, 3], [0]), "columns 3"),
                           (([0, 1, 1], [2, 1, 2], [3]), "logit_rows 3")):
            with pytest.raises(RuntimeError, match=what):
                call(*args)


def test_a_requests_logits_in_the_serving_engine_do_not_depend_on_the_requests_beside_it():
    """The same request alone and with others joining at other steps (longer prompts moving the
    timeline, so masked columns between its keys) and leaving: the same bits at every step."""
    model = _model()

    def run(others: bool) -> list[torch.Tensor]:
        engine, seen = BatchDecoder(model, slots=4), []
        with torch.inference_mode():
            seen.append(engine.add("me", [5, 9, 2]))
            for step in range(8):
                if others and step == 1:
                    engine.add("long", list(range(20, 31)))  # longer than the timeline: columns jump
                if others and step == 3:
                    engine.add_many(["a", "b"], [[7, 7], [1, 2, 3, 4]])
                if others and step == 6:
                    engine.remove("long")
                rows = list(engine.owners)
                logits = engine.step([3 + step if row == "me" else 11 for row in rows])
                seen.append(logits[rows.index("me")])
        return seen

    for alone, crowded in zip(run(False), run(True)):
        assert torch.equal(alone, crowded)
