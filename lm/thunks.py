"""Lazy-of-Thought: thunks in generated or placed text, forced only on demand.

A thunk is ``⟦name(args)⟧`` standing for text not yet generated; in this domain ``⟦ev(a+b*c)⟧``
stands for an item's two worked steps.  Each thunk carries a cost estimate (tokens its expansion
will take).  A :class:`DemandExecutor` forces a thunk only when a consumer asks for a value that
thunk holds, and splices the expansion in place (``Engine.replace``: the suffix's KV is recomputed
by one prefill pass, nothing else is regenerated).  :func:`place_thunks` is the planner-side pass
that turns worked items of a text into thunks (the seed's "regex pass" prototype).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from lm import chains, tokenizer
from lm.engine import Engine
from lm.errors import LMError
from lm.verifier import verify

THUNK_RE = re.compile(r"⟦(\w+)\(([^()⟦⟧]*)\)⟧")
_EV_ARGS = re.compile(r"^(\d+)\+(\d+)\*(\d+)$")


class ThunkError(LMError, ValueError):
    """A thunk that cannot be forced (unknown name, malformed arguments, no such item)."""


@dataclasses.dataclass(frozen=True)
class Thunk:
    name: str
    args: str
    start: int  # character span of ``⟦...⟧`` in the text
    end: int
    cost: int  # estimated tokens of its expansion

    @property
    def token_span(self) -> tuple[int, int]:
        return tokenizer.char_to_token(self.start), tokenizer.char_to_token(self.end)


def estimate_cost(name: str, args: str) -> int:
    """Tokens an expansion is expected to take, from the arguments alone (no arithmetic done):
    ``b*c=`` + up to ``len(b)+len(c)`` product digits + ``;`` + ``a+`` + product + ``=`` + up to
    ``max(len(a), product digits) + 1`` sum digits (the final ``;`` stays outside the thunk)."""
    m = _EV_ARGS.match(args)
    if name != "ev" or m is None:
        raise ThunkError(f"no cost model for thunk {name}({args})")
    a, b, c = (len(g) for g in m.groups())
    prod = b + c
    return (b + 1 + c + 1 + prod + 1) + (a + 1 + prod + 1 + max(a, prod) + 1)


def find_thunks(text: str) -> list[Thunk]:
    out = []
    for m in THUNK_RE.finditer(text):
        try:
            cost = estimate_cost(m.group(1), m.group(2))
        except ThunkError:
            cost = -1
        out.append(Thunk(m.group(1), m.group(2), m.start(), m.end(), cost))
    return out


def place_thunks(text: str, items_to_thunk: set[int]) -> str:
    """Replace the worked steps of the given items by their thunks (planner-side laziness)."""
    report = verify(text)
    spans = {}
    for step in report.steps:
        if step.item in items_to_thunk and step.kind in ("mul", "add"):
            s, e = spans.get(step.item, (step.start, step.end))
            spans[step.item] = (min(s, step.start), max(e, step.end))
    for item_i in sorted(spans, reverse=True):
        s, e = spans[item_i]
        text = text[:s] + report.items[item_i].thunk() + text[e:]
    return text


@dataclasses.dataclass(frozen=True)
class Expansion:
    tokens: tuple[int, ...]  # the text that replaces ``⟦...⟧`` (no trailing ``;``)
    decoded: int  # token forwards spent producing it
    prefilled: int


class ModelExpander:
    """Expands ``⟦ev(a+b*c)⟧`` by asking the model the one-item question ``Q:a+b*c;`` on a side
    sequence (greedy), then freeing it."""

    def __init__(self, engine: Engine, *, max_new: int = 40):
        self.engine = engine
        self.max_new = max_new

    def __call__(self, thunk: Thunk) -> Expansion:
        if thunk.name != "ev" or _EV_ARGS.match(thunk.args) is None:
            raise ThunkError(f"cannot expand {thunk.name}({thunk.args})")
        prompt = tokenizer.encode(f"Q:{thunk.args};")
        side = self.engine.start(prompt)
        try:
            new = self.engine.generate(side, self.max_new)
        finally:
            self.engine.free(side)
        if new and new[-1] == tokenizer.EOS:
            new = new[:-1]
        if new and new[-1] == tokenizer.token_id(";"):
            new = new[:-1]
        return Expansion(tuple(new), decoded=len(new), prefilled=len(prompt))


def exact_expander(thunk: Thunk) -> Expansion:
    """A tool that computes the expansion exactly (no model)."""
    m = _EV_ARGS.match(thunk.args)
    if thunk.name != "ev" or m is None:
        raise ThunkError(f"cannot expand {thunk.name}({thunk.args})")
    item = chains.Item(*map(int, m.groups()))
    return Expansion(tuple(tokenizer.encode(item.expansion()[:-1], bos=False)), 0, 0)


@dataclasses.dataclass(frozen=True)
class Forced:
    thunk: Thunk
    expansion: Expansion


class DemandExecutor:
    """Forces thunks of one sequence on demand and splices each expansion in place.

    Invariant: the sequence's text always parses (:func:`lm.verifier.verify`); a forced thunk's
    characters are replaced by its expansion and nothing else in the text changes.
    """

    def __init__(self, engine: Engine, seq_id: int, expander: Callable[[Thunk], Expansion]):
        self.engine = engine
        self.seq_id = seq_id
        self.expander = expander
        self.forced: list[Forced] = []

    def text(self) -> str:
        return tokenizer.decode(self.engine.tokens(self.seq_id))

    def thunks(self) -> list[Thunk]:
        return find_thunks(self.text())

    def force(self, thunk: Thunk) -> Forced:
        """Expand ``thunk`` (which must stand in the current text) and splice it in place."""
        current = self.thunks()
        if thunk not in current:
            raise ThunkError(f"thunk {thunk.name}({thunk.args}) at {thunk.start} is not in the text")
        exp = self.expander(thunk)
        start, end = thunk.token_span
        self.engine.replace(self.seq_id, start, end, exp.tokens)
        rec = Forced(thunk, exp)
        self.forced.append(rec)
        return rec

    def demand(self, item: int) -> int | None:
        """The value of question item ``item``, forcing its thunk if (and only if) it stands
        unexpanded.  ``None`` when the item's worked steps do not verify."""
        report = verify(self.text())
        if not 0 <= item < len(report.items):
            raise ThunkError(f"no item {item}; the question has {len(report.items)}")
        if item in report.thunked:
            target = report.items[item].thunk()[:-1]
            thunk = next(t for t in self.thunks() if self.text()[t.start : t.end] == target)
            self.force(thunk)
            report = verify(self.text())
        return report.values.get(item)

    def pending_cost(self) -> int:
        """Estimated tokens of every thunk not forced (the compute laziness has saved so far)."""
        return sum(t.cost for t in self.thunks() if t.cost > 0)
