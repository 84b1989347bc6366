"""``echo``: the smallest real service, used by tests, benchmarks and the demo.

The payload is returned unchanged, except that a map may ask for behaviour:

* ``{"steps": n, "step_ms": t}`` — compute in n steps of t ms each with a safe point between
  steps (so it can be preempted, resumed and cancelled); replies ``{"steps_done": n, "sum": s}``
  where s is a deterministic function of the steps, so a resumed run can be compared with an
  uninterrupted one.  Each step charges ``flops`` 1000.
* ``{"partials": n}`` — streams n PARTIAL replies ``{"i": k}`` before the final; with
  ``"pad": b`` each partial also carries ``b`` zero bytes (a large stream, for the per-peer byte
  budget tests) and a safe point comes before each; ``"partial_ms": t`` waits t ms before each.
* ``{"fail": "message"}`` — the handler raises (the caller gets ``service_error``).
* ``{"charge": {...}}`` — reports that spending to the kernel.
* ``{"report_token": true}`` — first streams a PARTIAL ``{"token": hex}`` with the request's
  kernel token (what an owner passes to ``mmi.preempt``; tests check no one else can use it).
Opaque MDP bodies are echoed frame for frame.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.base import Context, Service, main


#: The payload keys that ask for behaviour; a map with none of them is returned as it came.
_BEHAVIOUR = frozenset({"fail", "report_token", "charge", "pad", "partial_ms", "partials", "steps", "step_ms"})


class Echo(Service):
    name = "echo"

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict) or payload.keys().isdisjoint(_BEHAVIOUR):
            return payload  # the benchmarks' request: no conversions, no empty loops
        if "fail" in payload:
            raise RuntimeError(str(payload["fail"]))
        if payload.get("report_token"):
            await ctx.partial({"token": ctx.token.hex()})
        charge = payload.get("charge")
        if isinstance(charge, dict):
            ctx.charge(**{str(k): float(v) for k, v in charge.items()})
        pad = bytes(min(int(payload.get("pad", 0)), 1 << 20))
        gap_s = min(float(payload.get("partial_ms", 0)), 1000.0) / 1000.0
        for i in range(int(payload.get("partials", 0))):
            if gap_s > 0:
                await asyncio.sleep(gap_s)
            if pad:
                await ctx.checkpoint()  # a large stream pauses and stops when told
            await ctx.partial({"i": i, "pad": pad} if pad else {"i": i})
        steps = int(payload.get("steps", 0))
        if steps:
            step_s = float(payload.get("step_ms", 1.0)) / 1000.0
            acc = 0
            spin = 0
            for i in range(steps):
                await ctx.checkpoint()
                deadline = time.monotonic() + step_s
                while time.monotonic() < deadline:  # busy, like real compute
                    spin = (spin * 31 + i) % 1_000_003
                acc = (acc * 131 + i + 1) % 1_000_000_007
                ctx.charge(flops=1000)
            return {"steps_done": steps, "sum": acc}
        return payload


if __name__ == "__main__":
    raise SystemExit(main(Echo()))
