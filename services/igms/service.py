"""``igms``: drives a controlled ``sim`` run through the kernel and orders local refinement,
coarsening and time-step changes from the run's invariant residuals (see :mod:`services.igms`)."""

from __future__ import annotations

import collections
from typing import Any

from clients.core import Reply
from kernel import errors
from kernel.gate import AsyncKernelGate
from kernel import protocol as P
from services.base import Context
from services.common import BusService
from services.igms.logic import PrefetchedGate, order_from_actions, parse_request, report_from_wire, wanted_refinements
from sims.igms import IGMSController

#: Bound on the silence of the sim stream and on each kernel round trip, seconds.
CALL_TIMEOUT = 30.0


class IGMSService(BusService):
    """Ops: ``run`` (default): the payload is a ``sim`` run request (case, params, blocks, cells,
    max_level, t_end, ...) plus controller settings (indicator, refine_tol, coarsen_tol,
    regrid_every, calm_steps, ...).  The run goes to ``sim`` in the caller's job, in lockstep: after
    each step's report the controller decides, refinements are reserved from the kernel's gate
    (counted resource ``refinements`` of the job; a refusal means no refinement), and the order is
    sent to the worker holding the run.  A PARTIAL reports every step with actions.  The FINAL:
    the sim's summary plus the controller's counts.  ``stats``: totals over this worker's runs."""

    name = "igms"
    capacity = 4

    call_timeout = CALL_TIMEOUT

    def __init__(self) -> None:
        super().__init__()
        self.totals: collections.Counter[str] = collections.Counter()

    async def handle(self, ctx: Context, payload: Any) -> Any:
        op = payload.get("op", "run") if isinstance(payload, dict) else None
        if op == "run":
            return await self._run(ctx, payload)
        if op == "stats":
            return dict(self.totals)
        raise errors.BadRequest(f"unknown op {op!r}; igms takes run, stats")

    async def _run(self, ctx: Context, payload: dict) -> dict:
        client = self.client
        assert client is not None
        cfg, sim_request = parse_request(payload)
        job = ctx.job or "default"
        controller = IGMSController(cfg)
        kernel_gate = AsyncKernelGate(client, job)
        counts: collections.Counter[str] = collections.Counter()

        async def on_step(reply: Reply) -> None:
            if reply.status != P.STATUS_PARTIAL or not isinstance(reply.payload, dict) or "run" not in reply.payload:
                return  # e.g. the sim run's "paused" acknowledgement
            await ctx.checkpoint()
            wire = reply.payload
            report = report_from_wire(wire)
            counts["reports"] += 1
            # One round trip per regrid: the kernel grants (and spends) up to what the controller
            # can ask for; the controller then asks in order and stops at the first refusal, so
            # it uses exactly the units granted (Invariant: gate.used == granted).
            wanted = wanted_refinements(report, cfg)
            granted = int(await kernel_gate.reserve_up_to(cfg.resource, wanted)) if wanted else 0
            gate = controller.gate = PrefetchedGate(cfg.resource, granted)
            actions = controller.decide(report, now=report.time)
            counts["refinements_granted"] += gate.used
            counts["kernel_refusals"] += int(granted < wanted)
            order = order_from_actions(wire["run"], report.step, actions)
            counts["coarsened"] += len(order.get("coarsen", []))
            counts["dt_changes"] += int("dt_factor" in order)
            if report.status == "ok":
                await client.call(wire["control"], order, job=job)
            if len(order) > 3:
                await ctx.partial({"step": report.step, "time": report.time, "order": order,
                                   "refined_blocks": report.refined_blocks})

        summary = await client.call("sim", sim_request, job=job, on_partial=on_step)
        for k, v in counts.items():
            self.totals[k] += v
        self.totals["runs"] += 1
        counts["refinements_refused"] = controller.refused_refinements
        self.totals["refinements_refused"] += controller.refused_refinements
        return summary | {"igms": dict(counts), "indicator": cfg.indicator}
