"""``cswif``: the compute-safe what-if gate as a service (see :mod:`services.cswif`)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from kernel import errors
from services.base import Context
from services.common import BusService
from services.cswif.logic import DEFAULT_THRESHOLD, decision_to_wire, ledger_to_wire, parse_escalation
from services.cswif.predictor import ScalingLawPredictor
from sims.whatif import RichardsonSurrogate, WhatIfGate

#: Counted resource one approved escalation spends from the caller's job.
ESCALATIONS = "escalations"
#: Bound on the silence of an executed escalation's sim stream, seconds.
CALL_TIMEOUT = 60.0


class CSWIFService(BusService):
    """Ops:

    * ``request`` (default): ``{"escalation": {run_id, case, params, blocks, cells, from_level,
      to_level}, "execute": bool}``.  The surrogate's dry run (charged to the job as ``flops``, in
      a thread) predicts gain and cost; unless the gain per million extra cell updates clears the
      service's threshold the answer is :class:`kernel.errors.Refused` (detail: the prediction).
      An approved escalation spends one unit of the job's ``escalations`` (refused when that
      budget is exhausted); with ``execute`` it is then run on ``sim`` in the same job and its
      summary returned.  The threshold is the service's (``--threshold``), never the caller's.
    * ``outcome``: ``{run_id, realized_gain, realized_cost}`` for a decided escalation.
    * ``ledger``: every decision, its outcome, and the accuracy so far.
    * ``observe``: ``{case, params, cells_per_side, cost, error}`` of a finished run (cell updates,
      relative L1 error): history for the scaling-law predictor.

    ``--predictor scaling``: an escalation whose case has enough observations is predicted by the
    breakpoint scaling law (:mod:`services.cswif.predictor`; no dry run, nothing charged); others
    by the dry run.  ``--predictor surrogate`` (default): always the dry run.
    """

    call_timeout = CALL_TIMEOUT

    name = "cswif"
    capacity = 2

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.gate = WhatIfGate(RichardsonSurrogate(), threshold)
        self.law = ScalingLawPredictor()
        self.predictor = "surrogate"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threshold", type=float, default=self.gate.threshold,
                            help="relative gain per million extra cell updates an escalation must clear")
        parser.add_argument("--max-cost-fraction", type=float, default=0.1,
                            help="dry-run cost bound, as a fraction of the escalation's cost")
        parser.add_argument("--predictor", choices=("surrogate", "scaling"), default="surrogate",
                            help="scaling: the breakpoint law where a case has history, else the dry run")

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        self.gate = WhatIfGate(RichardsonSurrogate(max_cost_fraction=args.max_cost_fraction), args.threshold)
        self.predictor = args.predictor

    async def handle(self, ctx: Context, payload: Any) -> Any:
        op = payload.get("op", "request") if isinstance(payload, dict) else None
        if op == "request":
            return await self._request(ctx, payload)
        if op == "outcome":
            return self._outcome(payload)
        if op == "ledger":
            return ledger_to_wire(self.gate)
        if op == "observe":
            return self._observe(payload)
        raise errors.BadRequest(f"unknown op {op!r}; cswif takes request, outcome, ledger, observe")

    def _observe(self, payload: dict) -> dict:
        case, params = payload.get("case"), payload.get("params", {})
        if not isinstance(case, str) or not isinstance(params, dict):
            raise errors.BadRequest("observe takes case (a string) and params (a map)")
        try:
            self.law.observe(case, params, payload.get("cells_per_side"), payload.get("cost"), payload.get("error"))
        except (TypeError, ValueError) as exc:
            raise errors.BadRequest(f"observe: {exc}") from None
        return {"case": case, "observations": len(self.law.history[case]), "predicts": self.law.can_predict(case)}

    async def _request(self, ctx: Context, payload: dict) -> dict:
        esc = parse_escalation(payload)
        if esc.run_id in self.gate.ledger:
            raise errors.BadRequest(f"escalation {esc.run_id!r} was already decided")
        await ctx.checkpoint()
        use_law = self.predictor == "scaling" and self.law.can_predict(esc.case)
        try:
            predict = self.law.predict if use_law else self.gate.surrogate.predict
            prediction = await asyncio.to_thread(predict, esc)
        except ValueError as exc:
            raise errors.BadRequest(f"escalation {esc.run_id!r}: {exc}") from None
        if prediction.surrogate_cost:
            ctx.charge(flops=prediction.surrogate_cost)
        await ctx.checkpoint()
        decision = self.gate.decide(esc.run_id, prediction, time.monotonic())
        out = decision_to_wire(decision)
        if not decision.approved:
            raise errors.Refused(f"escalation {esc.run_id!r} refused: {decision.reason}", decision=out)
        assert self.client is not None
        job = ctx.job or "default"
        await self.client.reserve(job, ESCALATIONS, 1, commit=True)  # Refused when the job has none left
        if payload.get("execute"):
            run = {"op": "run", "case": esc.case, "params": esc.params, "blocks": esc.blocks, "cells": esc.cells,
                   "max_level": esc.to_level, "level": esc.to_level, "report_every": 1_000_000}
            out["run"] = await self.client.call("sim", run, job=job)
        return out

    def _outcome(self, payload: dict) -> dict:
        run_id = payload.get("run_id")
        gain, cost = payload.get("realized_gain"), payload.get("realized_cost")
        for v in (gain, cost):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0:
                raise errors.BadRequest(f"realized_gain and realized_cost must be numbers >= 0, got {v!r}")
        if run_id not in self.gate.ledger:
            raise errors.Refused(f"unknown escalation {run_id!r}: no decision recorded", run_id=run_id)
        self.gate.record_outcome(run_id, gain, cost)
        return {"run_id": run_id, "would_have_approved": self.gate.would_have_approved(run_id),
                "approved": self.gate.ledger[run_id].approved}
