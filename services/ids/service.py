"""IDS: pause a running decode at its next token boundary, inject text, resume — through the kernel.

The decode itself lives in the decode worker; this service only talks to the kernel with an
:class:`~clients.aio.AsyncClient`:

* pause: ask the decode worker (``state``) which request streams the decode, publish the
  kernel's ``mmi.preempt`` for that request's kernel token (exact, whoever sent it), then wait (bounded) until
  the decode worker reports it paused at a safe point.  The generate's caller sees a PARTIAL with
  status ``paused``;
* inject: one prefill of the injected tokens only (decode op ``inject``), refused unless the decode
  is paused (or has no generate streaming it);
* resume: ``mmi.resume`` for the same request token, refused (``bad_request``, kind
  ``NotPausedError``) unless the decode is paused.

Ops: ``{"op": "pause" | "inject" | "resume" | "interrupt", "decode": id, "text": ...}``;
``interrupt`` is pause + inject + resume.  Every call to the decode worker carries the caller's
job, so the tokens it costs are charged there.  Requests to the decode worker are never retried
(they are not idempotent).
"""

from __future__ import annotations

import time
from typing import Any

from kernel import errors
from kernel import protocol as P
from services.base import Context
from services.common import DecodeOrchestrator

#: Bound of one call to the decode worker, seconds.
CALL_TIMEOUT = 30.0
#: How long ``pause`` waits for the decode to reach a safe point, milliseconds.
PAUSE_WAIT_MS = 5_000


class IdsService(DecodeOrchestrator):
    call_timeout = CALL_TIMEOUT
    name = "ids"
    capacity = 8

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict) or payload.get("op") not in ("pause", "inject", "resume", "interrupt"):
            raise errors.BadRequest("ids ops: pause, inject, resume, interrupt ({'op', 'decode', 'text'})")
        did = payload.get("decode")
        op = payload["op"]
        if op == "pause":
            return await self.pause(ctx, did)
        if op == "resume":
            return await self.resume(ctx, did)
        if op == "inject":
            out = await self.inject(ctx, did, payload)
            if payload.get("resume"):
                out["resumed"] = (await self.resume(ctx, did))["resumed"]
            return out
        paused = await self.pause(ctx, did)
        if not paused["paused"]:
            raise errors.Refused(f"decode {did} ended before it reached a safe point", decode=did)
        out = await self.inject(ctx, did, payload)
        out["resumed"] = (await self.resume(ctx, did))["resumed"]
        out["pause_ms"] = paused["pause_ms"]
        return out

    async def pause(self, ctx: Context, did: Any) -> dict:
        """Preempt the generate streaming ``did``; returns its state with ``paused`` and
        ``pause_ms`` (publish to confirmed pause)."""
        assert self.client is not None
        st = await self._decode(ctx, {"op": "state", "decode": did})
        if st["paused"]:
            return {**st, "pause_ms": 0.0}
        if not st["running"]:
            raise errors.BadRequest(f"decode {did} has no generate running; nothing to pause", kind="NotRunning")
        t0 = time.perf_counter()
        await self.client.call(P.MMI_PREEMPT, {"token": st["request"]["token"], "service": self.decode_service})
        st = await self._decode(ctx, {"op": "state", "decode": did, "wait_paused_ms": PAUSE_WAIT_MS})
        st["pause_ms"] = 1e3 * (time.perf_counter() - t0)
        if st["running"] and not st["paused"]:
            raise errors.DeadlineExceeded(f"decode {did} did not pause within {PAUSE_WAIT_MS} ms", decode=did)
        return st

    async def inject(self, ctx: Context, did: Any, payload: dict) -> dict:
        body = {"op": "inject", "decode": did}
        for key in ("text", "tokens"):
            if key in payload:
                body[key] = payload[key]
        return await self._decode(ctx, body)

    async def resume(self, ctx: Context, did: Any) -> dict:
        assert self.client is not None
        st = await self._decode(ctx, {"op": "state", "decode": did})
        if not st["paused"]:
            raise errors.BadRequest(f"decode {did} is not paused; nothing to resume", kind="NotPausedError")
        await self.client.call(P.MMI_RESUME, {"token": st["request"]["token"], "service": self.decode_service})
        return {"decode": did, "resumed": True, "position": st["position"]}


SERVICE = IdsService()
