"""The batched decoder and its scheduler: greedy output equals one-at-a-time generation exactly,
whoever joins or leaves the batch when; seeds, stop ids, limits and cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge.inference import batch_decode
from lmforge.inference.batch_decode import BatchDecoder
from lmforge.inference.generate import SamplingConfig, generate
from lmforge.inference.scheduler import GenerationRequest, Scheduler
from lmforge.ops import kernels
from tests_serve_helpers import PROMPTS, peaked


def _run(scheduler: Scheduler, prompt: list[int], cfg: SamplingConfig, **extra) -> tuple[list[int], str]:
    done = threading.Event()
    tokens, reason = [], []
    request = GenerationRequest(prompt, cfg, on_token=tokens.append,
                                on_finish=lambda r: (reason.append(r), done.set()), **extra)
    scheduler.submit(request)
    assert done.wait(30)
    return tokens, reason[0]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_rows_joining_and_leaving_at_any_step_decode_as_alone(kind):
    model = peaked(context=24, kind=kind)
    lengths = [19, 23, 14, 21, 22, 9]  # every prompt runs to the end of the context: the timeline packs
    want = [generate(model, p, SamplingConfig(max_new_tokens=n, temperature=0)) for p, n in zip(PROMPTS, lengths)]
    decoder = BatchDecoder(model, slots=3)
    got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    waiting = list(range(len(PROMPTS)))
    with torch.inference_mode():
        while waiting or decoder.owners:
            while waiting and decoder.free:
                i = waiting.pop(0)
                got[i].append(int(decoder.add(i, PROMPTS[i]).argmax()))
            for i in list(decoder.owners):
                if len(got[i]) == lengths[i]:
                    decoder.remove(i)
            if decoder.owners:
                logits = decoder.step([got[i][-1] for i in decoder.owners])
                for i, row in zip(list(decoder.owners), logits):
                    got[i].append(int(row.argmax()))
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert decoder.t <= decoder.columns and decoder.free == 3
    assert len({tuple(w) for w in want}) == len(want)  # different continuations: a row mix-up would show


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_prompts_of_different_lengths_prefilled_together_decode_as_alone(kind):
    model = peaked(context=32, kind=kind)
    want = [generate(model, p, SamplingConfig(max_new_tokens=12, temperature=0)) for p in PROMPTS]
    decoder = BatchDecoder(model, slots=len(PROMPTS))
    with torch.inference_mode():
        decoder.add(-1, [9, 9, 9])  # a row already decoding: the new ones join the timeline after it
        decoder.step([4])
        got = {i: [int(row.argmax())] for i, row in enumerate(decoder.add_many(range(3), PROMPTS[:3]))}
        decoder.remove(-1)
        got.update({i + 3: [int(row.argmax())] for i, row in enumerate(decoder.add_many(range(3, 6), PROMPTS[3:]))})
        for _ in range(11):
            logits = decoder.step([got[i][-1] for i in decoder.owners])
            for i, row in zip(list(decoder.owners), logits):
                got[i].append(int(row.argmax()))
    assert [got[i] for i in range(len(PROMPTS))] == want


@pytest.mark.skipif(kernels.ops() is None, reason="the whole-step kernel is not loaded")
def test_prompts_joining_a_running_step_decode_as_alone():
    """Prompts prefilled inside the busy rows' step (each its own columns, seeing up to its own
    position) give the tokens they give alone, and so do the rows they joined."""
    model = peaked(context=40)
    new_tokens = 12
    want = [generate(model, p, SamplingConfig(max_new_tokens=new_tokens, temperature=0)) for p in PROMPTS]
    decoder = BatchDecoder(model, slots=len(PROMPTS))
    groups = [[1, 2], [3, 4, 5]]  # they join at later steps, while the rows before them decode
    got = {0: []}
    joins = 0
    with torch.inference_mode():
        got[0].append(int(decoder.add(0, PROMPTS[0]).argmax()))
        while decoder.owners:
            for i in list(decoder.owners):
                if len(got[i]) == new_tokens:
                    decoder.remove(i)
            if not decoder.owners:
                break
            tokens = [got[i][-1] for i in decoder.owners]
            group = groups[0] if groups and decoder.t + 1 >= max(len(PROMPTS[i]) for i in groups[0]) else []
            rows = list(decoder.owners)
            joined = decoder.join_step(tokens, group, [PROMPTS[i] for i in group]) if group else None
            if joined is None:
                assert not group, "a join that fits was declined"
                logits, new = decoder.step(tokens), []
            else:
                (logits, new), joins = joined, joins + 1
                groups.pop(0)
            for i, row in zip(rows, logits):
                got[i].append(int(row.argmax()))
            for i, row in zip(group, new):
                got[i] = [int(row.argmax())]
    assert joins == 2
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert decoder.free == len(PROMPTS)


def test_join_step_declines_what_it_does_not_run():
    model = peaked(context=40)
    decoder = BatchDecoder(model, slots=4)
    with torch.inference_mode():
        assert decoder.join_step([], [1], [[5, 6]]) is None  # no busy rows: a prefill of its own
        decoder.add(0, [3, 4])
        assert decoder.join_step([7], [1], [[5] * 4]) is None  # longer than the timeline so far
        assert decoder.join_step([7], [1], [[5] * (batch_decode.JOIN_TOKENS + 1)]) is None  # the BLAS's job
        with pytest.raises(ValueError, match="busy rows"):
            decoder.join_step([7, 8], [1], [[5]])
        assert decoder.owners == [0] and decoder.t == 2  # nothing changed


def test_scheduler_greedy_equals_generate_under_concurrency():
    model = peaked(context=32)
    scheduler = Scheduler(model, max_batch=4)
    try:
        cfgs = [SamplingConfig(max_new_tokens=6 + 3 * i, temperature=0, stop_ids=(5,)) for i in range(len(PROMPTS))]
        want = [generate(model, p, c) for p, c in zip(PROMPTS, cfgs)]
        results: list = [None] * len(PROMPTS)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _run(scheduler, PROMPTS[i], cfgs[i])))
                   for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r[0] for r in results] == want
        assert [r[1] for r in results] == ["length" if len(w) == c.max_new_tokens else "stop"
                                           for w, c in zip(want, cfgs)]
        assert scheduler.peak_batch >= 2 and scheduler.busy == 0
    finally:
        scheduler.close(10)


def test_seeds_repeat_and_penalties_change_the_output():
    model = peaked(context=32)
    scheduler = Scheduler(model, max_batch=2)
    try:
        cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=123)
        first, second = _run(scheduler, PROMPTS[0], cfg)[0], _run(scheduler, PROMPTS[0], cfg)[0]
        other = _run(scheduler, PROMPTS[0], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7))[0]
        assert first == second and first != other
        greedy = SamplingConfig(max_new_tokens=20, temperature=0)
        plain = _run(scheduler, PROMPTS[1], greedy)[0]
        penalized = _run(scheduler, PROMPTS[1], greedy, frequency_penalty=2.0)[0]
        assert plain != penalized  # repeated tokens pay
        assert max(penalized.count(t) for t in penalized) < max(plain.count(t) for t in plain)
        repeated = _run(scheduler, PROMPTS[1], SamplingConfig(max_new_tokens=20, temperature=0,
                                                             repetition_penalty=1.5))[0]
        assert repeated == generate(model, PROMPTS[1], SamplingConfig(max_new_tokens=20, temperature=0,
                                                                       repetition_penalty=1.5))
    finally:
        scheduler.close(10)


def test_limits_and_cancellation_free_the_row():
    model = peaked(context=16)
    scheduler = Scheduler(model, max_batch=1)
    try:
        with pytest.raises(ValueError, match="leaves room for 11 new tokens"):
            scheduler.submit(GenerationRequest([1, 2, 3, 4, 5], SamplingConfig(max_new_tokens=12, temperature=0),
                                               on_token=print, on_finish=print))
        with pytest.raises(ValueError, match="presence_penalty"):
            GenerationRequest([1], SamplingConfig(), on_token=print, on_finish=print, presence_penalty=3)
        finished = threading.Event()
        request = GenerationRequest([1, 2], SamplingConfig(max_new_tokens=14, temperature=0),
                                    on_token=lambda t: scheduler.cancel(request), on_finish=lambda r: finished.set())
        scheduler.submit(request)
        assert finished.wait(10) and len(request.generated) <= 2
        # the only row is free again: the next request runs to its end
        tokens, reason = _run(scheduler, [3, 4], SamplingConfig(max_new_tokens=14, temperature=0))
        assert (len(tokens), reason) == (14, "length") and scheduler.decoder.free == 1
    finally:
        scheduler.close(10)


def test_a_burst_of_requests_is_held_back_to_be_prefilled_together_and_a_lone_one_never(monkeypatch):
    from lmforge.inference import scheduler as scheduling

    scheduler = Scheduler(peaked(context=32), max_batch=4)
    try:
        clock = [100.0]
        monkeypatch.setattr(scheduling.time, "monotonic", lambda: clock[0])
        request = GenerationRequest([1, 2], SamplingConfig(max_new_tokens=2, temperature=0), on_token=print,
                                    on_finish=print, submitted=100.0)
        with scheduler._wake:  # the decode thread sleeps on this condition: nothing moves while it is held
            scheduler._waiting.append(request)
            scheduler._arrivals.extend([90.0, 100.0])
            assert scheduler._hold() == 0.0  # the last submission came alone
            scheduler._arrivals.extend([99.999, 100.0])
            hold = scheduler._hold()
            assert 0.0 < hold <= scheduling.BURST_GAP  # another may be on its way
            clock[0] = 100.0 + scheduling.BURST_GAP
            assert scheduler._hold() == 0.0  # a quiet gap: the burst is over
            scheduler._arrivals.extend([100.0 + scheduling.BURST_HOLD, 100.0 + scheduling.BURST_HOLD + 0.001])
            clock[0] = 100.0 + scheduling.BURST_HOLD + 0.001
            assert scheduler._hold() == 0.0  # the first waiting has waited long enough
            clock[0] = 100.0
            scheduler._arrivals.extend([99.999, 100.0])
            scheduler._waiting.extend([request] * 3)
            assert scheduler._hold() == 0.0  # no free row left for more of the burst
            scheduler._waiting.clear()
    finally:
        scheduler.close(10)
