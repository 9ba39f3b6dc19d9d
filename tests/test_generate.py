"""Generation: greedy/KV-cache equivalence, sliding window, logit filters, seeds, stop ids."""

import math

import pytest
import torch

from lmforge.inference.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    generate,
    stream_generate,
    top_k_filter,
    top_p_filter,
)
from lmforge.models.gpt import GPT, GPTConfig

VOCAB = 61
CONTEXT = 24


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=VOCAB, context=CONTEXT))
    with torch.no_grad():  # larger weights than the GPT-2 init: peaked, varied logits
        for p in m.parameters():
            p.normal_(std=0.3)
    return m.eval()


def reference_greedy(model: GPT, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Slow and obvious: full forward on the last CONTEXT tokens, argmax, every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-CONTEXT:]]))[0, -1]
            logits = apply_repetition_penalty(logits, ids, penalty)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_cache_equals_no_cache_past_context(model):
    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7]
    cfg = SamplingConfig(max_new_tokens=40, temperature=0)  # 10 + 40 > CONTEXT: sliding window
    cached = generate(model, prompt, cfg, use_cache=True)
    uncached = generate(model, prompt, cfg, use_cache=False)
    assert len(cached) == 40
    assert cached == uncached
    assert cached == reference_greedy(model, prompt, 40)
    assert len(set(cached)) >= 3  # a varied sequence, not one repeated token


def test_long_prompt_is_left_trimmed(model):
    prompt = [(7 * i) % VOCAB for i in range(50)]
    cfg = SamplingConfig(max_new_tokens=5, temperature=0)
    assert generate(model, prompt, cfg) == generate(model, prompt[-CONTEXT:], cfg) == reference_greedy(model, prompt, 5)


def test_repetition_penalty_in_generation_matches_reference(model):
    prompt = [1, 2, 3, 4, 1, 2]
    cfg = SamplingConfig(max_new_tokens=30, temperature=0, repetition_penalty=1.8)
    out = generate(model, prompt, cfg)
    assert out == reference_greedy(model, prompt, 30, penalty=1.8)
    assert out != reference_greedy(model, prompt, 30)


def test_repetition_penalty_exact_values():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 3], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.5, -6.0, 1.0]), rtol=0, atol=0)
    assert logits[0] == 2.0  # input untouched
    batched = apply_repetition_penalty(torch.tensor([[4.0, -4.0], [4.0, -4.0]]), torch.tensor([[0], [1]]), 4.0)
    torch.testing.assert_close(batched, torch.tensor([[1.0, -4.0], [4.0, -16.0]]), rtol=0, atol=0)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, -1.0])
    out = top_k_filter(logits, 3)  # ties at 1.0: still exactly 3 survivors
    kept = torch.isfinite(out).nonzero().flatten().tolist()
    assert len(kept) == 3 and {1, 4} <= set(kept)
    assert out[1] == 3.0 and out[4] == 2.0
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_k_sampling_draws_only_top_k(model):
    cfg = SamplingConfig(max_new_tokens=1, temperature=5.0, top_k=2)
    first = model(torch.tensor([[1, 2, 3]]))[0, -1]
    top2 = set(torch.topk(first, 2).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = {generate(model, [1, 2, 3], cfg, generator=gen)[0] for _ in range(40)}
    assert drawn == top2
    nucleus = SamplingConfig(max_new_tokens=1, temperature=5.0, top_k=3, top_p=1e-6)  # top-p after top-k
    assert {generate(model, [1, 2, 3], nucleus, generator=gen)[0] for _ in range(10)} == {int(first.argmax())}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95, 1.0
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [1]  # the top token alone reaches 0.4
    assert kept(0.7) == [1, 3]  # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == [0, 1, 3]  # 0.8 < 0.9 <= 0.95
    assert kept(0.99) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # always at least the top token
    out = top_p_filter(logits, 0.7)
    torch.testing.assert_close(out[[1, 3]], logits[[1, 3]], rtol=0, atol=0)
    renorm = out.softmax(-1)
    assert math.isclose(renorm[1].item(), 0.5 / 0.8, rel_tol=1e-6)


def test_temperature_zero_is_argmax(model):
    prompt = [5, 6, 7]
    out = generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0, top_k=1, top_p=0.1, seed=3))
    assert out == reference_greedy(model, prompt, 8)


def test_same_seed_same_samples(model):
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=1234)
    a, b = generate(model, [1, 2], cfg), generate(model, [1, 2], cfg)
    assert a == b
    c = generate(model, [1, 2], SamplingConfig(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=99))
    assert a != c
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert generate(model, [1, 2], SamplingConfig(max_new_tokens=20), generator=g1) == generate(
        model, [1, 2], SamplingConfig(max_new_tokens=20), generator=g2, use_cache=False
    )


def test_stop_id_ends_generation_and_is_not_yielded(model):
    prompt = [9, 8, 7]
    full = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0))
    i = next(i for i in range(1, 20) if full[i] not in full[:i])
    out = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0, stop_ids=[full[i]]))
    assert out == full[:i]


def test_stream_restores_training_flag_and_grad_mode(model):
    model.train()
    stream = stream_generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=10, temperature=0))
    next(stream)
    assert not torch.is_inference_mode_enabled()  # the caller's code between tokens runs normally
    assert not model.training
    stream.close()
    assert model.training
    model.eval()


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_k=0"):
        SamplingConfig(top_k=0)
    for field, value in (("temperature", float("inf")), ("temperature", float("nan")), ("max_new_tokens", 0),
                         ("repetition_penalty", float("inf")), ("top_p", 0.0), ("seed", -1)):
        with pytest.raises(ValueError, match=f"{field}="):
            SamplingConfig(**{field: value})
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(GPT(GPTConfig.from_preset("tiny", vocab_size=8)), [], SamplingConfig())
    assert SamplingConfig(stop_ids=[3, 4]).stop_ids == (3, 4)
