"""PSC-CR on the language model's arithmetic chains (:mod:`lm.chains`), combined with RoI-S.

A chain's verified state is checkpointed per item: when an item's two steps verify, their text
(as the model wrote it) is stored under the item's canonical key — ``a + b*c`` with the
commutative product's operands in canonical (sorted) order.  When the verifier flags a step of an
item, RoI-S would re-decode the flagged region with a beam; PSC-CR first looks for a verified
continuation of an equivalent item from an earlier branch (a cousin question: the same item,
possibly with the product's operands swapped, in another chain), translates it to this item's
operand order and grafts it in place of the region (the decode worker's ``replace``: no token is
decoded, the suffix's KV is recomputed by one prefill).  Only when no checkpoint exists is the
region re-decoded by RoI-S.

Honesty note: in this domain the verifier could compute every answer itself; PSC-CR never does
that.  A graft is text the model produced and the verifier accepted earlier — what a domain whose
checks are cheap and whose generation is costly can reuse.  Everything here is pure (the store is
:class:`services.psccr.logic.Checkpoints`).
"""

from __future__ import annotations

import re

from lm import chains
from lm.verifier import Report, StepCheck

_MUL = re.compile(r"^(\d+)\*(\d+)=(\d+)$")
_ADD = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
STEP = "chain-item"


def item_key(item: chains.Item) -> str:
    """``a + b*c`` keyed with the commutative product's operands sorted."""
    b, c = sorted((item.b, item.c))
    return f"item:{item.a}+{b}*{c}"


def record(report: Report, store) -> int:
    """Checkpoint every item whose two steps verified; returns how many were new."""
    by_item: dict[int, list[StepCheck]] = {}
    for s in report.steps:
        by_item.setdefault(s.item, []).append(s)
    new = 0
    for i, steps in by_item.items():
        if i < 0 or len(steps) != 2 or not all(s.ok for s in steps) or [s.kind for s in steps] != ["mul", "add"]:
            continue
        item = report.items[i]
        key = item_key(item)
        m = _MUL.match(steps[0].text)
        if m is None:
            continue
        product = m.group(3)
        value = _ADD.match(steps[1].text).group(3)
        # stored canonically: the product's operands sorted, as the key
        b, c = sorted((item.b, item.c))
        canonical = f"{b}*{c}={product};{item.a}+{product}={value};"
        if store.get(key, STEP) is None:
            new += 1
        store.put(key, STEP, canonical)
    return new


def graft_for(report: Report, store) -> tuple[int, int, str] | None:
    """``(char start, char end, text)`` to put in place of the first failed step's region, from a
    checkpoint of an equivalent item; ``None`` when there is none (or the failure is not one
    an item graft can fix)."""
    bad = report.first_error
    if bad is None or bad.kind not in ("mul", "add") or bad.item < 0:
        return None
    item = report.items[bad.item]
    stored = store.get(item_key(item), STEP)
    if stored is None:
        return None
    mul, add = stored.rstrip(";").split(";")
    m = _MUL.match(mul)
    if m is None:
        return None
    mul = f"{item.b}*{item.c}={m.group(3)}"  # translated back to this item's operand order
    text = f"{mul};{add};" if bad.kind == "mul" else f"{add};"
    start, end = bad.region
    return start, end, text


def repair(engine, seq_id: int, store, *, width: int = 8, max_rounds: int = 8, graft: bool = True) -> dict:
    """RoI-S repair of one decode in an in-process :class:`lm.engine.Engine`, with PSC-CR grafts
    first when ``graft``; checkpoints the verified items afterwards.  Returns counts: ``decoded``
    (token forwards re-decoding spans, all beam hypotheses), ``prefilled`` (by grafts and splices),
    ``grafts``, ``splices``, ``ok``."""
    from lm import tokenizer
    from lm.roi import accept_for, find_roi, text_of
    from lm.verifier import verify

    out = {"decoded": 0, "prefilled": 0, "grafts": 0, "splices": 0, "ok": False}
    for _ in range(max_rounds):
        text = text_of(engine, seq_id)
        report = verify(text)
        if report.ok:
            break
        before = engine.stats().prefilled
        plan = graft_for(report, store) if graft else None
        if plan is not None:
            start, end, new = plan
            engine.replace(seq_id, tokenizer.char_to_token(start), tokenizer.char_to_token(end),
                           tokenizer.encode(new, bos=False))
            out["grafts"] += 1
            out["prefilled"] += engine.stats().prefilled - before
            continue
        roi = find_roi(report)
        if roi is None:
            break
        res = engine.splice(seq_id, roi.start, roi.end, width=width, accept=accept_for(text, roi))
        out["splices"] += 1
        out["decoded"] += res.decoded
        out["prefilled"] += engine.stats().prefilled - before
        if res.new_span == res.old_span:
            break
    final = verify(text_of(engine, seq_id))
    out["ok"] = final.ok
    record(final, store)
    return out
