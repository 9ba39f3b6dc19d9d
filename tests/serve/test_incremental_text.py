"""A streamed reply's text decodes only the tokens since the last piece, yet its pieces join to
the whole reply decoded at once, for byte-level BPE (characters split across tokens) and for a
SentencePiece-style decoder (the first token's leading space dropped)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.inference.chat_session import StreamDecoder

TEXT = ("the king and the queen 今天天气怎么样 café naïve 🙂🙃 rode to the castle, "
        "and the duke's men followed them home. 你好 世界 ") * 20


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


def _metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    return tok


@pytest.mark.parametrize("make", [_byte_level, _metaspace])
def test_pieces_join_to_the_whole_decode_at_every_token(make):
    tok = make()
    ids = tok.encode(TEXT).ids
    assert len(ids) > 300  # long enough that decoding everything each time would be the slow path
    decoder = StreamDecoder(tok)
    joined = ""
    for n, token in enumerate(ids, 1):
        piece = decoder.push(token)
        assert "\ufffd" not in piece  # a character split over tokens comes out whole, later
        joined += piece
        whole = tok.decode(ids[:n])
        assert whole.startswith(joined) and len(whole) - len(joined) <= 4  # at most a held-back character
    assert joined == tok.decode(ids) == decoder.text


def test_a_character_split_over_tokens_is_held_until_complete():
    tok = _byte_level()
    ids = tok.encode("a\U0001F98Bb").ids  # a butterfly, never seen in training: its 4 bytes are several tokens
    assert len(ids) >= 4  # a, b and at least two for the character
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert pieces.count("") == len(ids) - 3  # held while the bytes were incomplete
    assert "".join(pieces) == "a\U0001F98Bb" and pieces[-2] == "\U0001F98B"
