"""Exact verifier of arithmetic chains (:mod:`lm.chains`): checks every step, finds the first
wrong one, and names the region a repair must re-decode.

All offsets are character offsets into the full text (prompt included); token positions are
``offset + 1`` (:func:`lm.tokenizer.char_to_token`).
"""

from __future__ import annotations

import dataclasses
import re

from lm import chains
from lm.errors import LMError

_HEADER = re.compile(r"^([QL]):((?:\d+\+\d+\*\d+)(?:,\d+\+\d+\*\d+)*);")
_ITEM = re.compile(r"(\d+)\+(\d+)\*(\d+)")
_MUL = re.compile(r"^(\d+)\*(\d+)=(\d+)$")
_ADD = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


class VerifierInputError(LMError, ValueError):
    """The text does not start with a well-formed question header."""


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """One checked segment of the answer.  ``kind``: ``mul`` | ``add`` | ``thunk`` | ``extra`` |
    ``missing``.  ``start``/``end``: its characters (``end`` includes the ``;`` when present).
    ``region``: what a repair must re-decode when this step is wrong — the step plus the steps of
    the same item that depend on it."""

    index: int
    item: int
    kind: str
    text: str
    start: int
    end: int
    ok: bool
    reason: str
    region: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Report:
    lazy: bool
    items: tuple[chains.Item, ...]
    steps: tuple[StepCheck, ...]
    values: dict[int, int]  # item index -> verified value (worked and correct items only)
    thunked: tuple[int, ...]  # item indices still standing as thunks

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def first_error(self) -> StepCheck | None:
        return next((s for s in self.steps if not s.ok), None)

    @property
    def n_checked(self) -> int:
        return sum(1 for s in self.steps if s.kind in ("mul", "add"))

    @property
    def n_correct(self) -> int:
        return sum(1 for s in self.steps if s.kind in ("mul", "add") and s.ok)


def parse_header(text: str) -> tuple[bool, list[chains.Item], int]:
    """``(lazy, items, answer_offset)`` of a chain text."""
    m = _HEADER.match(text)
    if m is None:
        raise VerifierInputError(f"no question header at the start of {text[:40]!r}")
    items = [chains.Item(*map(int, g)) for g in _ITEM.findall(m.group(2))]
    return m.group(1) == "L", items, m.end()


def verify(text: str) -> Report:
    """Check every step of ``text`` (prompt plus answer, no special tokens)."""
    lazy, items, at = parse_header(text)
    segments: list[tuple[str, int, int]] = []  # (body, start, end incl. ';')
    while at < len(text):
        semi = text.find(";", at)
        stop = len(text) if semi < 0 else semi + 1
        segments.append((text[at : stop if semi < 0 else semi], at, stop))
        at = stop
    steps: list[StepCheck] = []
    values: dict[int, int] = {}
    thunked: list[int] = []
    seg_i = 0
    for item_i, item in enumerate(items):
        if seg_i >= len(segments):
            steps.append(_missing(len(steps), item_i, len(text)))
            continue
        body, s, e = segments[seg_i]
        if body == item.thunk()[:-1]:
            steps.append(StepCheck(len(steps), item_i, "thunk", body, s, e, e <= len(text) and
                                   text[e - 1 : e] == ";", "unforced thunk", (s, e)))
            if not steps[-1].ok:
                steps[-1] = dataclasses.replace(steps[-1], reason="thunk without ';'")
            thunked.append(item_i)
            seg_i += 1
            continue
        # a worked item: a product step, then a sum step that restates the product's result
        nxt = segments[seg_i + 1] if seg_i + 1 < len(segments) else None
        item_end = nxt[2] if nxt is not None else e
        mul_ok, mul_reason, stated = _check_mul(body, item, e, text)
        steps.append(StepCheck(len(steps), item_i, "mul", body, s, e, mul_ok, mul_reason,
                               (s, item_end)))
        seg_i += 1
        if nxt is None:
            steps.append(_missing(len(steps), item_i, len(text)))
            continue
        body2, s2, e2 = nxt
        add_ok, add_reason, value = _check_add(body2, item, stated, e2, text)
        steps.append(StepCheck(len(steps), item_i, "add", body2, s2, e2, add_ok, add_reason, (s2, e2)))
        seg_i += 1
        if mul_ok and add_ok:
            values[item_i] = value
    for body, s, e in segments[seg_i:]:
        steps.append(StepCheck(len(steps), -1, "extra", body, s, e, False,
                               "text past the last item", (s, len(text))))
    return Report(lazy, tuple(items), tuple(steps), values, tuple(thunked))


def _missing(index: int, item: int, at: int) -> StepCheck:
    return StepCheck(index, item, "missing", "", at, at, False, "chain ends early", (at, at))


def _terminated(end: int, text: str) -> bool:
    return text[end - 1 : end] == ";"


def _check_mul(body: str, item: chains.Item, end: int, text: str) -> tuple[bool, str, int | None]:
    m = _MUL.match(body)
    if m is None:
        return False, f"malformed product step {body!r}", None
    b, c, x = map(int, m.groups())
    if (b, c) != (item.b, item.c):
        return False, f"operands {b}*{c} are not the item's {item.b}*{item.c}", x
    if x != item.product:
        return False, f"{b}*{c}={x} is wrong ({item.product})", x
    if not _terminated(end, text):
        return False, "step not terminated by ';'", x
    return True, "ok", x


def _check_add(
    body: str, item: chains.Item, stated: int | None, end: int, text: str
) -> tuple[bool, str, int | None]:
    m = _ADD.match(body)
    if m is None:
        return False, f"malformed sum step {body!r}", None
    a, x, y = map(int, m.groups())
    if a != item.a:
        return False, f"first operand {a} is not the item's {item.a}", None
    if x != stated:
        return False, f"operand {x} is not the product step's result {stated}", None
    if y != a + x:
        return False, f"{a}+{x}={y} is wrong ({a + x})", None
    if not _terminated(end, text):
        return False, "step not terminated by ';'", None
    return True, "ok", y
