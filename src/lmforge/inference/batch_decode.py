"""Decoding many sequences at once, each joining and leaving when it likes: the engine of serving.

Owns `BatchDecoder`: one preallocated KV cache of `slots` rows, a prefill that puts a new
prompt in a free row, and a step that feeds one token to every busy row in one forward, for
the causal LM families of `lmforge.models.decoding` (GPT, Llama).

The rows do not share a length, so the cache is a timeline of columns rather than positions:
every step writes the new keys and values of all busy rows at the same column `t`, and a
mask (0 or -inf, `hidden`) says which columns each row owns. Position enters as each row's own (GPT's
learned position embedding, added per row; Llama's rotary angles, turned into the keys before
they are cached), so where a row's keys sit in the timeline does not change its numbers; this
lets every step run the model's own block function (`block`, `llama_block`) on plain cache
views, as the single-sequence decoders do. A new prompt is written in the columns just before
`t` of its row; when the timeline is full, each row's columns are packed to the left.

Busy rows are kept at the front (rows 0 .. n - 1, in the order of `self.owners`): a row that
leaves is replaced by the last one, so every step works on views of the cache, not copies.

A GPT's step of up to `KERNEL_ROWS` rows runs through the whole-model C++ step
(`gpt_decode.rows_step`), where each row's numbers are the same whichever rows share its step.
Prefills and wider steps (and any step where the kernels are not loaded) run block by block; on
a CPU they read a second copy of the projection and output weights, stored transposed (an
(out, in) view of (in, out) memory): `F.linear` then runs x W^T as a product of two row-major
matrices, which the BLAS does markedly faster for several rows than the product with the stored
weight's transpose. A step of one row reads the model's own weights, whose product (one row
against each weight row) is the faster one there. The price is that second copy of the weights
while serving.

Prompts that come while rows are busy join their step (`join_step`, a GPT's whole-step kernel):
each of a prompt's positions is one more row of the step, all writing the prompt's cache row,
each at its own column and seeing the columns up to it. The step then prefills them in the same
pass over the weights that decodes the busy rows, instead of a pass of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.gpt import GPT, Affine, BlockParts
from lmforge.models.gpt_decode import Decoder, decode_block, prefill_block, rows_step, with_weights
from lmforge.models.llama import Llama, llama_block
from lmforge.models.llama_decode import LlamaDecoder
from lmforge.ops.rotary import rms_norm

WIDE_ROWS = 4
"""From this many rows on, a GPT's step reads the transposed copy of the weights."""
JOIN_TOKENS = 128
"""The most prompt tokens that join a running step (`join_step`): up to here the pass over the
weights it saves outweighs the step's loops being slower than the BLAS's products in a prefill
of their own."""
JOIN_ROWS = 160
"""The most rows (busy rows and joining prompts' positions) of a step that prompts join."""


class _GPTRows:
    """GPT's part of a batched step: learned positions added to the input, LayerNorm at the end."""

    def __init__(self, model: GPT) -> None:
        self.p = Decoder(model)  # the model's tensors, read once (refuses a model in training mode)
        c = model.config
        self.kv_heads, self.head_dim, self.blocks, self.weight = c.n_head, c.head_dim, self.p.blocks, self.p.wte
        self.wide = (self.blocks, self.p.lm_head)  # what a step of WIDE_ROWS rows or more reads
        self.stepper = self.p  # what the whole-step kernel reads
        if self.p.wte.device.type == "cpu":  # the CPU BLAS's faster layout for several rows (module docstring)
            self.wide = ([_transposed_weights(parts) for parts in self.blocks], _stored_transposed(self.p.lm_head))
            self.stepper = with_weights(self.p, *self.wide)

    def blocks_for(self, rows: int) -> list:
        return self.wide[0] if rows >= WIDE_ROWS else self.blocks

    def whole_step(self, ids: Tensor, positions: Tensor, visible: Tensor | None, k: Tensor, v: Tensor,
                   t: int, joined: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor | None:
        return rows_step(self.stepper, ids, positions, visible, k, v, t, joined)  # None: block by block

    def inputs(self, ids: Tensor, positions: Tensor) -> tuple[Tensor, None]:
        return F.embedding(ids, self.p.wte) + F.embedding(positions, self.p.wpe), None  # (..., C)

    def block(self, x: Tensor, parts, extra: None, visible: Tensor | None, kv: tuple[Tensor, Tensor], col: int,
              causal: bool = False) -> Tensor:
        if x.dim() == 3:  # a prefill: one C++ call a layer where it applies
            return prefill_block(x, parts, visible, causal, kv, col)
        return decode_block(x, parts, visible, kv, col)  # one C++ call for a step's rows where it applies

    def head(self, x: Tensor) -> Tensor:
        p = self.p
        weight = self.wide[1] if x.shape[0] >= WIDE_ROWS else p.lm_head
        return F.linear(torch.layer_norm(x, p.shape, *p.ln_f, p.eps), weight)


def _stored_transposed(weight: Tensor) -> Tensor:
    """weight (out, in) with the same values in (in, out) memory order."""
    return weight.detach().t().contiguous().t()


def _transposed_weights(parts: BlockParts) -> BlockParts:
    """parts with every plain projection's weight `_stored_transposed` (an adapted one stays as it is)."""
    names = ("c_attn", "attn_proj", "c_fc", "mlp_proj")
    return parts._replace(**{name: Affine(_stored_transposed(getattr(parts, name).weight), getattr(parts, name).bias)
                             for name in names if isinstance(getattr(parts, name), Affine)})


class _LlamaRows:
    """Llama's part: rotary angles of each row's positions, RMSNorm at the end."""

    def __init__(self, model: Llama) -> None:
        self.p = LlamaDecoder(model)
        c = model.config
        self.kv_heads, self.head_dim, self.blocks, self.weight = c.kv_heads, c.hs, self.p.blocks, self.p.embed

    def inputs(self, ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = F.embedding(ids, self.p.embed)  # (..., C)
        cos, sin = self.p.rope.get(x.device, x.dtype, int(positions.max()) + 1)  # (P, hs) each
        return x, (cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2))  # (..., 1, hs): per row

    def block(self, x: Tensor, parts, rope, visible: Tensor | None, kv: tuple[Tensor, Tensor], col: int,
              causal: bool = False) -> Tensor:
        return llama_block(x, parts, rope, visible, causal, kv, col)

    def blocks_for(self, rows: int) -> list:
        return self.blocks

    def whole_step(self, *args, **kwargs) -> None:
        return None  # a Llama's step runs block by block (and prompts do not join it)

    def head(self, x: Tensor) -> Tensor:
        return F.linear(rms_norm(x, self.p.norm, self.p.eps), self.p.lm_head)


def _rows_of(model: nn.Module) -> _GPTRows | _LlamaRows:
    if isinstance(model, GPT):
        return _GPTRows(model)
    if isinstance(model, Llama):
        return _LlamaRows(model)
    raise ValueError(f"batched decoding runs GPT and Llama checkpoints; this one is a {type(model).__name__}")


class BatchDecoder:
    """`add(key, prompt)` -> logits of the prompt's last position; `step(tokens)` -> logits (n, V)
    of the next token of every busy row, in the order of `owners`; `remove(key)` frees a row."""

    def __init__(self, model: GPT | Llama, slots: int) -> None:
        self.rows = _rows_of(model)
        if slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1")
        self.context = model.config.context
        self.columns = self.context + min(self.context, 512)  # packed at most every 512 steps
        r, weight = self.rows, self.rows.weight
        shape = (len(r.blocks), slots, r.kv_heads, self.columns, r.head_dim)  # as KVCache's, a longer timeline
        self.k = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        self.v = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        # additive: 0 on the columns a row owns, -inf elsewhere (read in place by the decode step)
        self.hidden = torch.full((slots, self.columns), float("-inf"), device=weight.device, dtype=weight.dtype)
        self.lengths: list[int] = []  # tokens held per busy row, in the order of `owners`: the next position
        self.owners: list[object] = []
        self.slots = slots
        self.t = 0  # the column the next step writes

    @property
    def free(self) -> int:
        return self.slots - len(self.owners)

    def add(self, key: object, prompt: Sequence[int]) -> Tensor:
        """Prefill `prompt` into a free row owned by `key`; logits (V,) for the token after it."""
        return self.add_many([key], [prompt])[0]

    def add_many(self, keys: Sequence[object], prompts: Sequence[Sequence[int]]) -> Tensor:
        """Prefill several prompts in one forward, each into a free row owned by its key; logits
        (R, V) for the token after each. The prompts are left-padded to the longest: the padding's
        columns belong to no row, and each row's positions start at 0 at its first real token."""
        lengths = [len(p) for p in prompts]
        if any(not 1 <= n < self.context for n in lengths):
            raise ValueError(f"prompts of {lengths} tokens: each must be 1 to {self.context - 1} (the context "
                             "leaves room for at least one new token)")
        if len(prompts) > self.free:
            raise ValueError(f"{len(prompts)} prompts for {self.free} free rows; remove finished sequences first")
        n, R, device = max(lengths), len(prompts), self.k.device
        if max(self.t, n) >= self.columns:
            self._pack()
        first = len(self.owners)
        start = self.t - n if self.t >= n else 0
        self.t = max(self.t, n)
        pads = torch.tensor([n - m for m in lengths], device=device)  # (R,)
        ids = torch.zeros((R, n), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        positions = (torch.arange(n, device=device) - pads[:, None]).clamp(min=0)  # (R, n)
        x, extra = self.rows.inputs(ids, positions)  # (R, n, C)
        real = torch.arange(n, device=device) >= pads[:, None]  # (R, n): not padding
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()  # (n, n)
        visible = torch.zeros((R, 1, n, start + n), dtype=torch.bool, device=device)
        # a real query sees the real keys up to itself; a padding query only itself (never used)
        visible[:, 0, :, start:] = (causal & real[:, None, :]) | torch.eye(n, dtype=torch.bool, device=device)
        plain = start == 0 and bool(real.all())  # from column 0, no padding: the causal forward itself
        for layer, parts in enumerate(self.rows.blocks_for(R * n)):
            kv = (self.k[layer, first:first + R], self.v[layer, first:first + R])  # (R, nh, columns, hs)
            x = self.rows.block(x, parts, extra, None if plain else visible, kv, start, plain)  # (R, n, C)
        self.hidden[first:first + R] = float("-inf")
        self.hidden[first:first + R, start:start + n].masked_fill_(real, 0.0)
        self.lengths.extend(lengths)
        self.owners.extend(keys)
        return self._logits(x[:, -1])  # (R, V)

    def step(self, tokens: Sequence[int]) -> Tensor:
        """Feed tokens[i] to busy row i (as ordered in `owners`); logits (n, V) of what follows each."""
        n = len(self.owners)
        if len(tokens) != n or n == 0:
            raise ValueError(f"{len(tokens)} tokens for {n} busy rows")
        if max(self.lengths) >= self.context:
            raise ValueError(f"a row is at the end of the context ({self.context} positions); remove it first")
        if self.t >= self.columns:
            self._pack()
        t, device = self.t, self.k.device
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=device)
        positions = torch.as_tensor(self.lengths, dtype=torch.long, device=device)  # (n,): one new position per row
        self.hidden[:n, t] = 0.0
        self.lengths = [length + 1 for length in self.lengths]
        self.t = t + 1
        # every row's mask, even where all see everything: a row's numbers do not depend on the others
        logits = self.rows.whole_step(ids, positions, self.hidden[:n, :t + 1], self.k, self.v, t)
        if logits is not None:
            return logits.float()
        visible = self.hidden[:n, None, None, :t + 1]  # (n, 1, 1, t + 1)
        visible = None if bool((visible == 0).all()) else visible.contiguous()  # all see all: no mask, as generate
        x, extra = self.rows.inputs(ids, positions)  # (n, C)
        for layer, parts in enumerate(self.rows.blocks_for(n)):
            x = self.rows.block(x, parts, extra, visible, (self.k[layer, :n], self.v[layer, :n]), t)  # (n, C)
        return self._logits(x)

    def join_step(self, tokens: Sequence[int], keys: Sequence[object], prompts: Sequence[Sequence[int]]
                  ) -> tuple[Tensor, Tensor] | None:
        """`step(tokens)` with `prompts` prefilled into free rows in the same pass over the weights:
        (logits (n, V) of the busy rows, logits (R, V) after each prompt); or None, nothing done,
        where that does not apply (no busy rows, over `JOIN_TOKENS`, a prompt longer than the
        timeline so far, a model or setting without the whole-step kernel). A prompt of m tokens
        takes columns t - m + 1 .. t of its row, t being the step's column: it ends where the
        busy rows' new positions are written, and goes on with them."""
        n, lengths = len(self.owners), [len(p) for p in prompts]
        if not n or not prompts or sum(lengths) > JOIN_TOKENS or n + sum(lengths) > JOIN_ROWS:
            return None
        if len(tokens) != n or len(keys) != len(prompts) or len(prompts) > self.free or min(lengths) < 1:
            raise ValueError(f"{len(tokens)} tokens for {n} busy rows and {len(prompts)} prompts for {self.free} "
                             "free rows, each of at least one token")
        if self.t >= self.columns:
            self._pack()
        t = self.t
        if max(lengths) > t + 1 or max([*self.lengths, *lengths]) >= self.context:
            return None
        slots = [*range(n), *(n + i for i, m in enumerate(lengths) for _ in range(m))]
        columns = [t] * n + [t - m + 1 + j for m in lengths for j in range(m)]
        mask = self.hidden.new_full((len(slots), t + 1), float("-inf"))
        mask[:n] = self.hidden[:n, :t + 1]
        mask[:n, t] = 0.0
        ends = [n + m for m in itertools.accumulate(lengths)]  # one past each prompt's rows
        for m, end in zip(lengths, ends):
            mask[end - m:end, t - m + 1:] = 0.0  # its own columns (each row sees up to its own)
        def as_long(values) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.k.device)

        logits = self.rows.whole_step(
            as_long([*tokens, *(i for p in prompts for i in p)]),
            as_long([*self.lengths, *(j for m in lengths for j in range(m))]), mask, self.k, self.v, t,
            joined=(as_long(slots), as_long(columns), as_long([*range(n), *(end - 1 for end in ends)])))
        if logits is None:
            return None
        self.hidden[:n, t] = 0.0
        for i, m in enumerate(lengths):
            self.hidden[n + i] = float("-inf")
            self.hidden[n + i, t - m + 1:t + 1] = 0.0
        self.lengths = [length + 1 for length in self.lengths] + lengths
        self.owners.extend(keys)
        self.t = t + 1
        logits = logits.float()
        return logits[:n], logits[n:]

    def position(self, key: object) -> int:
        """How many tokens the row of `key` holds (prompt + fed tokens)."""
        return self.lengths[self.owners.index(key)]

    def remove(self, key: object) -> None:
        """Free the row of `key`: the last busy row moves into it."""
        row, last = self.owners.index(key), len(self.owners) - 1
        if row != last:
            self.k[:, row, :, :self.t] = self.k[:, last, :, :self.t]
            self.v[:, row, :, :self.t] = self.v[:, last, :, :self.t]
            self.hidden[row] = self.hidden[last]
            self.lengths[row] = self.lengths[last]
            self.owners[row] = self.owners[last]
        self.owners.pop()
        self.lengths.pop()
        self.hidden[last] = float("-inf")
        if not self.owners:
            self.t = 0

    def _pack(self) -> None:
        """Move each busy row's columns to the front of the timeline, in order."""
        longest = 0
        for row in range(len(self.owners)):
            cols = (self.hidden[row] == 0).nonzero().flatten()  # (m,)
            m = cols.numel()
            self.k[:, row, :, :m] = self.k[:, row, :, cols]
            self.v[:, row, :, :m] = self.v[:, row, :, cols]
            self.hidden[row] = float("-inf")
            self.hidden[row, :m] = 0.0
            longest = max(longest, m)
        self.t = longest

    def _logits(self, x: Tensor) -> Tensor:
        """Final hidden rows (n, C) -> logits (n, V) in float32."""
        return self.rows.head(x).float()
