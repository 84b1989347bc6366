"""Character-level tokenizer for the arithmetic-chain domain.

Token ids: ``PAD=0``, ``BOS=1``, ``EOS=2``, then one id per character of :data:`CHARS`. The thunk
brackets ``⟦`` and ``⟧`` are single characters, hence single tokens. Because every character is
one token and every encoded text starts with ``BOS``, character offset ``c`` of a text is token
position ``c + 1`` of its encoding (:func:`char_to_token`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lm.errors import VocabularyError

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
THUNK_OPEN, THUNK_CLOSE = "⟦", "⟧"
CHARS = "0123456789+-*=;,:()QLA" + "abcdefghijklmnopqrstuvwxyz" + THUNK_OPEN + THUNK_CLOSE

_ID_OF = {ch: i + len(SPECIALS) for i, ch in enumerate(CHARS)}
VOCAB_SIZE = len(SPECIALS) + len(CHARS)


def encode(text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text``; raises :class:`VocabularyError` naming the first unknown character."""
    ids = [BOS] if bos else []
    for offset, ch in enumerate(text):
        tid = _ID_OF.get(ch)
        if tid is None:
            raise VocabularyError(f"character {ch!r} at offset {offset} is not in the vocabulary")
        ids.append(tid)
    if eos:
        ids.append(EOS)
    return ids


def decode(ids: Iterable[int]) -> str:
    """Text of ``ids``; special tokens are dropped.  Raises :class:`VocabularyError` on bad ids."""
    out = []
    for tid in ids:
        check_id(tid)
        if tid >= len(SPECIALS):
            out.append(CHARS[tid - len(SPECIALS)])
    return "".join(out)


def check_id(tid: int) -> None:
    if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < VOCAB_SIZE:
        raise VocabularyError(f"token {tid!r} is outside the vocabulary [0, {VOCAB_SIZE})")


def check_ids(ids: Sequence[int]) -> list[int]:
    """``ids`` as a list of ints after checking every one is in the vocabulary."""
    out = [int(t) if hasattr(t, "__index__") and not isinstance(t, bool) else t for t in ids]
    for tid in out:
        check_id(tid)
    return out


def token_id(ch: str) -> int:
    """The id of a single character."""
    try:
        return _ID_OF[ch]
    except KeyError:
        raise VocabularyError(f"character {ch!r} is not in the vocabulary") from None


def char_to_token(offset: int) -> int:
    """Token position of character ``offset`` in ``encode(text)`` (BOS occupies position 0)."""
    return offset + 1
