"""``popb``: the per-operator precision budgeter as a service.

Ops (``{"op": ...}``):

* ``probe`` ``{seed=7, length=512}``: the one-step sensitivity probe of :func:`lm.popb.probe` on
  the long-context model: per operator and token group the KL of the output when that operator
  alone is int8, the hot spots, and the probe's cost (charged as ``flops``-free wall time; the
  kernel measures it);
* ``plan`` ``{avg_bits, seed=7, publish=true}``: probe, build the per-block masks that fit the
  average-bits budget (:func:`lm.popb.plan`) and, with ``publish``, send them to the decode
  worker as an order on ``ctl/decode/precision`` (``mmi.control``).  The budget is the request's
  granted ``avg_bits`` (the kernel clamps it to the job's) when the header asks for one, else the
  payload's ``avg_bits``; a payload asking for more than the grant is clamped to the grant;
* ``order`` ``{operators: {"L0.attn": "int8", ...}} | {codes, block} | {reset: true}``: check an
  order (unknown operators, matrices or precisions are a ``bad_request`` naming them) and publish
  it as is.

The model is loaded once per process (:func:`lm.longmodel.load`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from kernel import errors
from kernel import protocol as P
from lm import popb
from lm.errors import LMError
from lm.longmodel import load
from services.base import Context
from services.common import BusService

#: The service whose control topic carries the orders (``ctl/decode/precision``).
TARGET = "decode"


class PopbService(BusService):
    name = "popb"
    capacity = 2

    def __init__(self) -> None:
        super().__init__()
        self.model = None

    async def setup(self) -> None:
        await super().setup()
        self.model = load()

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict) or payload.get("op") not in ("probe", "plan", "order"):
            raise errors.BadRequest("popb ops: probe, plan, order")
        op = payload["op"]
        try:
            if op == "order":
                return await self._order(payload)
            seed, length = payload.get("seed", 7), payload.get("length", 512)
            for key, v, lo, hi in (("seed", seed, 0, 2**31), ("length", length, 128, 4096)):
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise errors.BadRequest(f"'{key}' must be an integer in [{lo}, {hi}]")
            pr = await asyncio.to_thread(popb.probe, self.model, seed=seed, length=length)
            out = {"kl": pr.kl, "hot": [list(h) for h in pr.hot], "probe_s": pr.seconds, "probe_tokens": pr.tokens}
            if op == "probe":
                return out
            bits = self._budget(ctx, payload)
            plan = popb.plan(self.model, pr, bits)
            out.update(avg_bits=plan.avg_bits(self.model), budget_bits=bits)
            if payload.get("publish", True):
                await self._publish(plan.to_wire())
                out["published"] = P.control_topic(TARGET, P.ControlOp.PRECISION).decode()
            else:
                out["order"] = plan.to_wire()
            return out
        except LMError as exc:
            raise errors.BadRequest(str(exc), kind=type(exc).__name__) from None

    def _budget(self, ctx: Context, payload: dict) -> float:
        granted = ctx.granted.get("avg_bits")
        asked = payload.get("avg_bits", granted)
        if isinstance(asked, bool) or not isinstance(asked, (int, float)):
            raise errors.BadRequest("give 'avg_bits' (a number >= 8), or a budget with avg_bits")
        return float(min(asked, granted)) if isinstance(granted, (int, float)) else float(asked)

    async def _order(self, payload: dict) -> dict:
        order = {k: v for k, v in payload.items() if k != "op"}
        if order.get("reset") is not True:
            plan = popb.PrecisionPlan.from_wire(self.model, order)  # raises on anything unknown
            order = plan.to_wire()
        await self._publish(order)
        return {"published": P.control_topic(TARGET, P.ControlOp.PRECISION).decode()}

    async def _publish(self, message: dict) -> None:
        assert self.client is not None
        await self.client.call(P.MMI_CONTROL, {"op": P.ControlOp.PRECISION.value, "service": TARGET,
                                               "message": message}, retries=0)


SERVICE = PopbService()
