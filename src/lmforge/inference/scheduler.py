"""Continuous batching: requests join the running batch at the next step and leave when they stop.

Owns `GenerationRequest` (a prompt's token ids, its own sampling settings and generator, and
two callbacks) and `Scheduler`, a thread that steps a `BatchDecoder`: at every step it admits
waiting requests into free rows (one prefill each), feeds every busy row its last token in one
forward, picks each row's next token with that request's settings, and hands it to
`on_token`. A request leaves at a stop id, at its token limit, or when cancelled (a client that
went away): its row is free for the next step. The engine sees token ids only.

Greedy rows take the first maximum of their logits, as `stream_generate` does, so a greedy
request gives the tokens it gives alone (tests/serve/test_batch_decode.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.inference.batch_decode import BatchDecoder
from lmforge.inference.generate import SamplingConfig, _pick, apply_repetition_penalty
from lmforge.models.gpt import GPT
from lmforge.models.llama import Llama


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to continue. `on_token(id)` gets each new token; `on_finish(reason)` comes once,
    last, with "stop" (a stop id), "length" (max_new_tokens), "cancelled" or "error: ..."."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated."""
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    submitted: float = 0.0
    """When the scheduler took it (time.monotonic())."""
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name}={value!r}: must be a number from -2 to 2")
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty: give at least one token id")

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the batch's argmax is this row's token."""
        s = self.sampling
        return s.temperature == 0 and s.repetition_penalty == 1.0 and not self.presence_penalty \
            and not self.frequency_penalty


BURST_GAP = 0.003
"""Seconds: submissions closer together than this are a burst (many clients at once)."""
BURST_HOLD = 0.015
"""Seconds a waiting prompt may be held back while a burst is still arriving, so that its prompts
are prefilled together: one pass over the weights instead of one per arrival."""


class Scheduler:
    """Runs requests on `model` in batches of up to `max_batch` rows, on its own thread."""

    def __init__(self, model: GPT | Llama, max_batch: int) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}: must be an integer >= 1")
        self.decoder = BatchDecoder(model, max_batch)
        self.device = self.decoder.k.device
        self.context = model.config.context
        self._waiting: deque[GenerationRequest] = deque()
        self._arrivals: deque[float] = deque(maxlen=2)  # the last two submission times
        self._wake = threading.Condition()
        self._closing = False
        self._next: dict[GenerationRequest, int] = {}  # the token each busy row is fed next
        self.peak_batch = 0
        """The most rows one step has decoded together so far."""
        self.finished: Counter[str] = Counter()
        """How many requests ended for each reason ("stop", "length", "cancelled", "error")."""
        self._thread = threading.Thread(target=self._run, name="lmforge-decode", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> int:
        """Requests being decoded plus those waiting for a row."""
        return len(self.decoder.owners) + len(self._waiting)

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request`; it starts at the next step with a free row."""
        room = self.context - len(request.prompt_ids)
        if request.sampling.max_new_tokens > room:
            raise ValueError(f"a prompt of {len(request.prompt_ids)} tokens leaves room for {max(room, 0)} new "
                             f"tokens in the context of {self.context}; asked for {request.sampling.max_new_tokens}")
        s = request.sampling
        if s.temperature > 0 and request.generator is None:
            request.generator = torch.Generator(device=self.device)
            request.generator.manual_seed(s.seed if s.seed is not None else torch.seed())
        with self._wake:
            if self._closing:
                raise RuntimeError("the scheduler is shutting down")
            request.submitted = time.monotonic()
            self._arrivals.append(request.submitted)
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Stop `request` at the next step (its row is freed then); `on_finish("cancelled")` follows."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the ones queued and running, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def _hold(self) -> float:
        """Seconds to keep the waiting prompts back (0: prefill them now): while a burst is arriving
        and rows are free for more of it, until BURST_GAP passes without a submission or the
        first of them has waited BURST_HOLD. A lone request is never held."""
        if self._closing or not self._waiting or len(self._waiting) >= self.decoder.free or len(self._arrivals) < 2:
            return 0.0
        before, last = self._arrivals
        if last - before >= BURST_GAP:
            return 0.0
        now = time.monotonic()
        return max(0.0, min(BURST_GAP - (now - last), BURST_HOLD - (now - self._waiting[0].submitted)))

    def _run(self) -> None:
        while True:
            with self._wake:
                while True:
                    if self._closing and not self._waiting and not self.decoder.owners:
                        return
                    hold = self._hold()
                    if self.decoder.owners or (self._waiting and not hold):
                        break  # a step to run (the busy rows go on while a burst is held back)
                    self._wake.wait(hold or None)
                count = 0 if hold else min(self.decoder.free, len(self._waiting))
                admitted = [self._waiting.popleft() for _ in range(count)]
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception as err:  # a bug, not a user's input: fail the requests involved, keep serving
                for request in [*admitted, *self.decoder.owners]:
                    self._finish(request, f"error: {type(err).__name__}: {err}")

    def _step(self, admitted: list[GenerationRequest]) -> None:
        for request in list(self.decoder.owners):
            if request.cancelled:
                self._finish(request, "cancelled")
        for request in [r for r in admitted if r.cancelled]:
            self._finish(request, "cancelled")
        admitted = [r for r in admitted if not r.cancelled]
        rows = list(self.decoder.owners)
        if admitted and rows:  # short prompts join the busy rows' step: one pass over the weights
            joined = self.decoder.join_step([self._next[r] for r in rows], admitted, [r.prompt_ids for r in admitted])
            if joined is not None:
                self.peak_batch = max(self.peak_batch, len(rows) + len(admitted))
                self._choose(rows, joined[0])
                self._choose(admitted, joined[1])
                return
        if admitted:  # the waiting prompts prefilled together, in one forward
            self._choose(admitted, self.decoder.add_many(admitted, [r.prompt_ids for r in admitted]))
        rows = list(self.decoder.owners)
        if not rows:
            return
        logits = self.decoder.step([self._next[r] for r in rows])  # (n, V)
        self.peak_batch = max(self.peak_batch, len(rows))
        self._choose(rows, logits)

    def _choose(self, rows: list[GenerationRequest], logits: Tensor) -> None:
        """Pick each row's next token from its logits (n, V): the greedy rows all from one argmax
        (the first maximum of each row), the others with their own settings."""
        best = logits.max(-1).indices.tolist()
        for i, request in enumerate(rows):
            self._hand_over(request, best[i] if request.plain_greedy else self._sample(request, logits[i]))

    def _hand_over(self, request: GenerationRequest, token: int) -> None:
        """Give the request its next token, and retire it when done."""
        if token in request.sampling.stop_ids:
            self._finish(request, "stop")
            return
        request.generated.append(token)
        try:
            request.on_token(token)
        except Exception as err:  # the receiver is gone: nobody reads the rest
            self._finish(request, f"error: {err}")
            return
        if len(request.generated) >= request.sampling.max_new_tokens:
            self._finish(request, "length")
        else:
            self._next[request] = token

    def _sample(self, request: GenerationRequest, logits: Tensor) -> int:
        s = request.sampling
        if s.repetition_penalty != 1.0:
            seen = request.prompt_ids + request.generated
            logits = apply_repetition_penalty(logits, torch.tensor(seen, device=logits.device), s.repetition_penalty)
        if (request.presence_penalty or request.frequency_penalty) and request.generated:
            counts = torch.bincount(torch.tensor(request.generated, device=logits.device),
                                    minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)  # (V,)
            logits = logits - counts * request.frequency_penalty - (counts > 0).to(logits.dtype) \
                * request.presence_penalty
        return int(_pick(logits, s, request.generator))

    def _finish(self, request: GenerationRequest, reason: str) -> None:
        if request in self.decoder.owners:
            self.decoder.remove(request)
        self._next.pop(request, None)
        self.finished[reason.partition(":")[0]] += 1
        try:
            request.on_finish(reason)
        except Exception:  # the receiver is gone; the row is free all the same
            pass

