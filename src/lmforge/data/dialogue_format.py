"""The dialogue sample format, shared by dialogue training and `lmforge chat`.

One dialogue is one sample, as in GPT2-chitchat: `[CLS] u1 [SEP] u2 [SEP] u3 [SEP] ...`.
Turns alternate between the user (role 0) and the model's replies (role 1); every turn ends
with exactly one [SEP], so turn boundaries are the [SEP] positions. A tokenizer without
[CLS]/[SEP] uses its end-of-text id for both.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.base.tokenizer import SpecialIds

USER, RESPONSE = 0, 1
ROLE_NAMES = {"user": USER, "human": USER, "system": USER,
              "assistant": RESPONSE, "bot": RESPONSE, "gpt": RESPONSE, "model": RESPONSE}


def dialogue_specials(ids: SpecialIds, where: str = "tokenizer") -> tuple[int, int]:
    """(cls, sep) ids: [CLS]/[SEP] of a WordPiece tokenizer, or the end-of-text id for both."""
    cls = ids.cls if ids.cls is not None else ids.bos
    sep = ids.sep if ids.sep is not None else ids.eos
    if cls is None or sep is None:
        raise ValueError(f"{where}: no [CLS]/[SEP] (or <|endoftext|>) token; train a tokenizer with "
                         f"`lmforge tokenizer train --kind wordpiece`")
    return cls, sep


def recent_turns_start(turn_lengths: Sequence[int], max_len: int) -> int:
    """Index of the first turn kept so that [CLS] + turns (each + [SEP]) fit in max_len.

    Whole turns are dropped from the front; the last turn is always kept (cut by build_sample
    when it alone does not fit).
    """
    used, start = 1, len(turn_lengths)
    while start > 0 and used + turn_lengths[start - 1] + 1 <= max_len:
        used += turn_lengths[start - 1] + 1
        start -= 1
    return min(start, max(0, len(turn_lengths) - 1))


def build_sample(turns: Sequence[Sequence[int]], roles: Sequence[int], cls: int, sep: int,
                 max_len: int | None = None) -> tuple[list[int], list[int]]:
    """`[CLS] t1 [SEP] t2 [SEP] ...` and its per-token roles, at most max_len tokens.

    Longer dialogues keep their most recent whole turns; if the last turn alone is too long,
    its last max_len - 2 tokens are kept (then [SEP]).
    """
    if max_len is not None and max_len < 3:
        raise ValueError(f"max_len must be >= 3 ([CLS], one token, [SEP]), got {max_len}")
    start = 0 if max_len is None else recent_turns_start([len(t) for t in turns], max_len)
    ids, token_roles = [cls], [USER]
    for turn, role in zip(turns[start:], roles[start:]):
        turn = list(turn)
        if max_len is not None and len(turn) + 2 > max_len:
            turn = turn[len(turn) - (max_len - 2):]
        ids += turn + [sep]
        token_roles += [role] * (len(turn) + 1)
    return ids, token_roles


def split_turns(ids: Sequence[int], roles: Sequence[int], sep: int) -> tuple[list[list[int]], list[int]]:
    """The inverse of build_sample: a stored sample -> (turns without [SEP], their roles)."""
    turns, turn_roles, current = [], [], []
    for token, role in zip(list(ids)[1:], list(roles)[1:]):
        if token == sep:
            turns.append(current)
            turn_roles.append(int(role))
            current = []
        else:
            current.append(int(token))
    return turns, turn_roles
