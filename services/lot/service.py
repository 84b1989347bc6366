"""Lazy-of-Thought through the kernel: force only the thunks a consumer demands.

A decode's text may hold thunks ``⟦ev(a+b*c)⟧`` (:mod:`lm.thunks`).  ``demand`` returns the
value of one question item: if the item is worked out already its verified value is returned and
nothing is computed; if it stands as a thunk, that thunk alone is expanded and spliced in place
by the decode worker (op ``replace``: one prefill of the expansion and the suffix, nothing else
re-decoded).  Expanders: ``model`` asks the decode worker to answer the one-item question
``Q:a+b*c;`` on a side decode (freed after); ``tool`` computes the expansion exactly
(:func:`lm.thunks.exact_expander`).

Before forcing, the thunk's cost estimate (:func:`lm.thunks.estimate_cost`, plus the side
prompt for ``model``) is checked against the tokens the kernel granted this request: a demand
that cannot fit is refused (``refused``, with ``estimate``) before any compute is spent.

Ops: ``{"op": "thunks", "decode": id}``; ``{"op": "demand", "decode": id, "item": k,
"expander": "model" | "tool"}``.
"""

from __future__ import annotations

from typing import Any

from kernel import errors
from lm import tokenizer
from lm.errors import LMError
from lm.thunks import Thunk, ThunkError, exact_expander, find_thunks
from lm.verifier import verify
from services.base import Context
from services.common import DecodeOrchestrator

CALL_TIMEOUT = 60.0
#: Tokens a model expansion may decode (the longest item's expansion is 24 characters).
EXPAND_MAX_NEW = 40


def thunk_view(t: Thunk) -> dict:
    return {"name": t.name, "args": t.args, "chars": [t.start, t.end], "tokens": list(t.token_span),
            "cost": t.cost}


def side_prompt(t: Thunk) -> str:
    return f"Q:{t.args};"


class LotService(DecodeOrchestrator):
    call_timeout = CALL_TIMEOUT
    name = "lot"
    capacity = 8

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("lot ops: thunks, demand")
        op = payload.get("op")
        if op == "thunks":
            st = await self._decode(ctx, {"op": "state", "decode": payload.get("decode")})
            ts = find_thunks(st["text"])
            return {"decode": st["decode"], "thunks": [thunk_view(t) for t in ts],
                    "pending_cost": sum(t.cost for t in ts if t.cost > 0)}
        if op == "demand":
            return await self.demand(ctx, payload)
        raise errors.BadRequest(f"unknown op {op!r}; lot ops: thunks, demand")

    async def demand(self, ctx: Context, payload: dict) -> dict:
        did, item = payload.get("decode"), payload.get("item")
        expander = payload.get("expander", "model")
        if expander not in ("model", "tool"):
            raise errors.BadRequest(f"expander must be 'model' or 'tool', got {expander!r}")
        st = await self._decode(ctx, {"op": "state", "decode": did})
        text = st["text"]
        try:
            report = verify(text)
        except LMError as exc:
            raise errors.BadRequest(str(exc), kind=type(exc).__name__) from None
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < len(report.items):
            raise errors.BadRequest(f"no item {item!r}; the question has {len(report.items)}", kind="ThunkError")
        if item not in report.thunked:
            return {"decode": did, "item": item, "value": report.values.get(item), "forced": False,
                    "text": text, "pending_cost": sum(t.cost for t in find_thunks(text) if t.cost > 0)}
        target = report.items[item].thunk()[:-1]
        thunk = next(t for t in find_thunks(text) if text[t.start:t.end] == target)
        estimate = thunk.cost + (len(tokenizer.encode(side_prompt(thunk))) if expander == "model" else 0)
        granted = ctx.granted.get("tokens")
        if granted is not None and estimate > granted:
            raise errors.Refused(f"forcing {target} is estimated at {estimate} tokens; {granted:g} granted",
                                 estimate=estimate, granted=granted)
        decoded = prefilled = 0
        if expander == "model":
            side = await self._decode(ctx, {"op": "generate", "prompt": side_prompt(thunk),
                                            "max_new": EXPAND_MAX_NEW, "keep": False})
            new = list(side["new"])
            decoded, prefilled = len(new), len(tokenizer.encode(side_prompt(thunk)))
            while new and new[-1] in (tokenizer.EOS, tokenizer.token_id(";")):
                new.pop()
            expansion = new
        else:
            try:
                expansion = list(exact_expander(thunk).tokens)
            except ThunkError as exc:
                raise errors.BadRequest(str(exc), kind="ThunkError") from None
        start, end = thunk.token_span
        out = await self._decode(ctx, {"op": "replace", "decode": did, "start": start, "end": end,
                                       "tokens": expansion})
        after = verify(out["text"])
        return {"decode": did, "item": item, "value": after.values.get(item), "forced": True,
                "thunk": thunk_view(thunk), "expansion": tokenizer.decode(expansion), "estimate": estimate,
                "decoded": decoded, "prefilled": prefilled + len(expansion) + (len(st["tokens"]) - end),
                "text": out["text"], "pending_cost": sum(t.cost for t in find_thunks(out["text"]) if t.cost > 0)}


SERVICE = LotService()
