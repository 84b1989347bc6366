"""RoI-S through the kernel: verify a decode's chain, map the first failing step to a token span,
and ask the decode worker to splice only that span with a wider beam; repeat until it verifies.

The verifier and the span mapping are :mod:`lm.verifier` / :func:`lm.roi.find_roi` (pure logic);
the splice runs in the decode worker (op ``splice``, exact mode by default: the suffix is kept and
its KV recomputed by one prefill).  Ops:

* ``{"op": "verify", "decode": id}`` or ``{"op": "verify", "text": str}``: the verifier's report;
* ``{"op": "repair", "decode": id, "width": 8, "max_rounds": 4, "mode": "exact"}``: repair in
  place; returns every splice (span, old and new text, tokens re-decoded), whether it verifies and
  why it stopped.  A safe point sits between rounds.
"""

from __future__ import annotations

from typing import Any

from kernel import errors
from lm.errors import LMError
from lm.roi import find_roi
from lm.verifier import Report, verify
from services.base import Context
from services.common import DecodeOrchestrator

CALL_TIMEOUT = 60.0
MAX_ROUNDS = 16


def report_view(report: Report) -> dict:
    """A wire view of a verifier report: the first error with its character and token spans."""
    bad = report.first_error
    out: dict[str, Any] = {"ok": report.ok, "values": {str(k): v for k, v in report.values.items()},
                           "thunked": list(report.thunked), "checked": report.n_checked,
                           "correct": report.n_correct, "first_error": None}
    if bad is not None:
        roi = find_roi(report)
        out["first_error"] = {"kind": bad.kind, "item": bad.item, "text": bad.text, "reason": bad.reason,
                              "chars": [bad.start, bad.end], "region": list(bad.region),
                              "tokens": [roi.start, roi.end] if roi is not None else None}
    return out


def _verify(text: str) -> Report:
    try:
        return verify(text)
    except LMError as exc:
        raise errors.BadRequest(str(exc), kind=type(exc).__name__) from None


class RoisService(DecodeOrchestrator):
    call_timeout = CALL_TIMEOUT
    name = "rois"
    capacity = 8

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("rois ops: verify, repair")
        op = payload.get("op")
        if op == "verify":
            if isinstance(payload.get("text"), str):
                return report_view(_verify(payload["text"]))
            st = await self._decode(ctx, {"op": "state", "decode": payload.get("decode")})
            return report_view(_verify(st["text"]))
        if op == "repair":
            return await self.repair(ctx, payload)
        raise errors.BadRequest(f"unknown op {op!r}; rois ops: verify, repair")

    async def repair(self, ctx: Context, payload: dict) -> dict:
        did = payload.get("decode")
        width = payload.get("width", 8)
        max_rounds = errors.require_int(payload, "max_rounds", 4, lo=1, hi=MAX_ROUNDS)
        mode = payload.get("mode", "exact")
        splices: list[dict] = []
        reason = "round limit"
        for _ in range(max_rounds):
            st = await self._decode(ctx, {"op": "state", "decode": did})
            report = _verify(st["text"])
            if report.ok:
                reason = "verified"
                break
            roi = find_roi(report)
            if roi is None:
                reason = f"unrepairable failure: {report.first_error.reason}"
                break
            res = await self._decode(ctx, {"op": "splice", "decode": did, "start": roi.start, "end": roi.end,
                                           "width": width, "mode": mode, "verify": True})
            splices.append({"span": [roi.start, roi.end], "step": roi.step.kind, "reason": roi.step.reason,
                            "old": res["old_span"], "new": res["new_span"], "accepted": res["accepted"],
                            "repaired": res["repaired"], "suffix_len": res["suffix_len"]})
            if res["new_span"] == res["old_span"]:
                reason = "beam found no different span"
                break
            await ctx.checkpoint()
        st = await self._decode(ctx, {"op": "state", "decode": did})
        final = _verify(st["text"])
        return {"decode": did, "ok": final.ok, "reason": "verified" if final.ok else reason,
                "rounds": len(splices), "splices": splices,
                "repaired": sum(s["repaired"] for s in splices), "text": st["text"],
                "report": report_view(final)}


SERVICE = RoisService()
