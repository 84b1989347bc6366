"""The long-context workload: variable references across thousands of tokens (passkey-style).

A context defines a few variables early (or anywhere in its first part), buries them in filler,
and then asks for them back::

    <bos>=kQ;!#$%&...(thousands of filler tokens)...=m7;...*+-/?kQ;?m7;

``=kQ;`` defines ``k`` as ``Q`` (one of 36 symbols); the answer to the query ``?k`` is ``Q;``: the
model has to find a definition that may lie the whole context back (associative recall, as in
the MQAR task of Arora et al. 2023; the name directly before its value makes it the induction-head
pattern a two-layer transformer learns fastest).  Filler comes from its own alphabet, so nothing but the definition
can answer.  Its own character tokenizer (one token
per character, ids 0..2 the specials) keeps it apart from the chain model's.

Data are generated from a seeded RNG (no download).  Training draws from
:data:`TRAIN_SEED`; held-out contexts from other seeds.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

from lm.errors import VocabularyError

PAD, BOS, EOS = 0, 1, 2
VALUES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
NAMES = "abcdefghijklmnop"
FILLER = "!#$%&*+-/<>@^_~|"
CHARS = VALUES + NAMES + "=;?" + FILLER
VOCAB_SIZE = 3 + len(CHARS)
_ID = {ch: i + 3 for i, ch in enumerate(CHARS)}
VALUE_LEN = 1
#: Tokens of one query's answer: the value and the closing ``;``.
ANSWER_LEN = VALUE_LEN + 1
TRAIN_SEED = 17_017


def encode(text: str, *, bos: bool = False) -> list[int]:
    out = [BOS] if bos else []
    for offset, ch in enumerate(text):
        tid = _ID.get(ch)
        if tid is None:
            raise VocabularyError(f"character {ch!r} at offset {offset} is not in the varref vocabulary")
        out.append(tid)
    return out


def decode(ids: Iterable[int]) -> str:
    out = []
    for tid in ids:
        if not isinstance(tid, int) or not 0 <= tid < VOCAB_SIZE:
            raise VocabularyError(f"token {tid!r} outside [0, {VOCAB_SIZE})")
        if tid >= 3:
            out.append(CHARS[tid - 3])
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Context:
    """One long context: its prompt tokens, the variables it defines (name -> value) and where."""

    tokens: tuple[int, ...]
    values: dict[str, str]
    def_positions: dict[str, int]

    def query(self, name: str) -> list[int]:
        """The tokens that ask for ``name``: ``?name``."""
        return encode(f"?{name}")

    def answer(self, name: str) -> list[int]:
        return encode(self.values[name] + ";")


def make_context(rng: random.Random, length: int, n_vars: int = 4, *, early: float = 0.5) -> Context:
    """A context of exactly ``length`` tokens (BOS included) defining ``n_vars`` variables.

    The first definition follows BOS; the others start at uniform positions in the first
    ``early`` fraction of the context (never overlapping).  The rest is filler.
    """
    def_len = 2 + VALUE_LEN + 1  # "=kQ;"
    if n_vars < 1 or length < 1 + 3 * n_vars * def_len + def_len:
        raise ValueError(f"length {length} too short for {n_vars} definitions")
    names = rng.sample(NAMES, n_vars)
    values = {n: "".join(rng.choice(VALUES) for _ in range(VALUE_LEN)) for n in names}
    body = [rng.choice(FILLER) for _ in range(length - 1)]
    span = min(length - def_len, max(int((length - 1) * early), 3 * n_vars * def_len))
    starts = [0]
    tries = 0
    while len(starts) < n_vars:
        tries += 1
        s = rng.randrange(0, span)
        if all(abs(s - t) >= def_len for t in starts):
            starts.append(s)
        elif tries > 10_000:  # pragma: no cover - only for absurdly dense requests
            raise ValueError("cannot place the definitions without overlap")
    positions = {}
    for name, s in zip(names, starts):
        text = f"={name}{values[name]};"
        body[s : s + def_len] = list(text)
        positions[name] = s + 2
    tokens = [BOS] + [_ID[ch] for ch in body]
    return Context(tuple(tokens), values, positions)


def training_example(rng: random.Random, length: int, n_queries: int = 4) -> tuple[list[int], list[int]]:
    """(tokens, loss mask) of a context followed by ``n_queries`` queries with their answers;
    the mask marks the positions whose *next* token is a value token of an answer."""
    ctx = make_context(rng, length, rng.randint(1, max(1, min(8, (length - 8) // 12))))
    tokens = list(ctx.tokens)
    mask = [0] * len(tokens)
    names = list(ctx.values)
    for _ in range(n_queries):
        name = rng.choice(names)
        tokens += ctx.query(name)
        mask += [0, 1]
        ans = ctx.answer(name)
        tokens += ans
        mask += [1] * (len(ans) - 2) + [0, 0]
    return tokens, mask


def check_ids(ids: Sequence[int]) -> list[int]:
    out = []
    for tid in ids:
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < VOCAB_SIZE:
            raise VocabularyError(f"token {tid!r} outside [0, {VOCAB_SIZE})")
        out.append(int(tid))
    return out
