"""``kvtp``: long-context decodes over tiered KV blocks whose device arena is held through the gate.

One op, ``{"op": "run", "varref": {...} | "tokens": [...], "policy": {...}, "tiers": {...},
"queries": [name, ...], "keep": false}``:

1. the decode worker prefills the context into a tiered decoder (``long_open``); it holds the
   device arena (``tiers.device_blocks``) as the counted resource ``kv_blocks`` of the caller's
   job through the kernel's gate, so a job cannot hold more device blocks than its budget, and a
   refusal is the kernel's typed ``refused`` before anything is allocated;
2. it answers the queries (``long_ask``; each answer is forwarded as a PARTIAL, and every token
   is a safe point of the decode worker, where the kernel's preempt pauses it);
3. the decode is freed (unless ``keep``), which gives the arena back, whatever happened.

``policy`` is any policy of :func:`lm.longsession.parse_policy` (``sparse``, ``full``,
``topk_keys``), ``cold`` (the cold tier of :mod:`lm.coldtier`: distant blocks compressed and found
by vector search; :func:`lm.longsession.parse_cold`) or ``recurrent`` (a constant-state peer).

The reply carries the answers and the tier counters (hits, misses, prefetches, stalls, device
bytes).  Every call to the decode worker carries the caller's job, so its tokens and its
``kv_blocks`` are the job's.
"""

from __future__ import annotations

from typing import Any

from kernel import errors
from services.base import Context
from services.common import DecodeOrchestrator

#: Bound on the silence of one call to the decode worker (a 32k prefill on a contended CPU takes
#: tens of seconds), seconds.
CALL_TIMEOUT = 600.0


class KvtpService(DecodeOrchestrator):
    name = "kvtp"
    capacity = 4
    call_timeout = CALL_TIMEOUT

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict) or payload.get("op", "run") != "run":
            raise errors.BadRequest("kvtp takes {'op': 'run', varref|tokens, policy, tiers, queries}")
        tiers = payload.get("tiers")
        n = tiers.get("device_blocks") if isinstance(tiers, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise errors.BadRequest("'tiers.device_blocks' must be a positive integer (the kv_blocks to hold)")
        queries = payload.get("queries", [])
        if not isinstance(queries, list):
            raise errors.BadRequest("'queries' must be a list of variable names")
        long_id = None
        try:
            opened = await self._decode(ctx, {**{k: v for k, v in payload.items() if k not in ("op", "queries", "keep")},
                                              "op": "long_open"})
            long_id = opened["long"]
            await ctx.partial({"long": long_id, "opened": True, "kv_blocks": n})
            result: dict = {"long": long_id, "answers": [], **opened}
            if queries:
                result = await self.client.call(
                    self.decode_service, {"op": "long_ask", "long": long_id, "queries": queries},
                    job=ctx.job, retries=0, on_partial=lambda r: ctx.partial(r.payload),
                    on_behalf=ctx.principal or None)
            result["kv_blocks"] = n
            return result
        finally:
            if long_id is not None and not payload.get("keep", False):
                await self._decode(ctx, {"op": "long_free", "long": long_id})


SERVICE = KvtpService()
