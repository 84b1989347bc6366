"""``css``: the constraint-slack scheduler as a service (the shell around
:class:`services.css.logic.Funder` and the case of :mod:`services.css.problem`).

Request payload::

    {"policy": "maxmin",                  # or "worst_first", "round_robin" (the peers)
     "start": {"cells", "dt_factor", "order", "derivation"?},
     "tolerance_m": 3e-4,                 # or "constraints": [{name, quantity, op, limit, scale}]
     "actions": ["refine", ...],          # listing order of the actions (what the peers follow)
     "resource": "cell_updates",          # the job's counted resource that funds the runs
     "max_rounds": 30}

Everything is validated before the first run (units of every limit and scale against the
measured quantity, the derivation's expected dimension, the start configuration): a defect is a
``bad_request``.  Each round: measure the configuration with a real shallow-water run -- its cost
(cell updates) is first held from the caller's job through the kernel's gate (``mmi.gate.reserve``
of the predicted count; a refusal ends the run with ``budget_spent``), and after the run exactly the
cell updates done are committed and the hold returned -- compute every
slack, and fund the next actions.  Rounds stream as PARTIALs and go to the decision log
(``mmi.audit``, source ``css``).  FINAL: ``{satisfied, stopped, slacks, rounds, compute, charged, state}`` (``charged`` equals
``compute`` unless the job's budget ran out during the last run).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from kernel import errors
from kernel import protocol as P
from services.base import Context
from services.common import BusService
from services.css import problem
from services.css.logic import POLICIES, ConstraintError, Funder

MAX_ROUNDS = 100
#: Lease of the hold on a run's predicted cost while it runs, seconds.
HOLD_LEASE_S = 600.0


def parse_request(payload: Any) -> dict[str, Any]:
    """Validate a request; :class:`ConstraintError` (``bad_request``) on any defect."""
    if not isinstance(payload, dict):
        raise ConstraintError("a css request is a map", reason="type")
    policy = payload.get("policy", "maxmin")
    if policy not in POLICIES:
        raise ConstraintError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}", reason="policy")
    if "constraints" in payload:
        docs = payload["constraints"]
        if not isinstance(docs, list) or not docs:
            raise ConstraintError("'constraints' must be a non-empty list", reason="type")
    else:
        tol = payload.get("tolerance_m", 3e-4)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
            raise ConstraintError("'tolerance_m' must be a positive number (metres)", reason="range")
        docs = problem.default_constraints(float(tol))
    constraints = problem.constraints(docs)
    names = [c.name for c in constraints]
    if len(set(names)) != len(names) or "units" in names:
        raise ConstraintError("constraint names must be unique ('units' is the derivation's)", reason="duplicate")
    start = problem.parse_start(payload.get("start", {}))
    acts = {a.name: a for a in problem.actions()}
    order = payload.get("actions", list(acts))
    if not isinstance(order, list) or sorted(order) != sorted(acts):
        raise ConstraintError(f"'actions' must list each of {sorted(acts)} once", reason="actions")
    resource = payload.get("resource", "cell_updates")
    if not isinstance(resource, str) or not resource:
        raise ConstraintError("'resource' must name a counted resource", reason="type")
    rounds = payload.get("max_rounds", 30)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ConstraintError(f"'max_rounds' must be an integer in 1..{MAX_ROUNDS}", reason="range")
    return {"policy": policy, "constraints": constraints, "start": start, "actions": [acts[n] for n in order],
            "resource": resource, "max_rounds": rounds}


def slacks_of(constraints: list, measured: dict, cfg: problem.Config) -> dict[str, float]:
    out = {c.name: c.slack(measured[c.quantity]) for c in constraints}
    out["units"] = 1.0 if cfg.derivation.check()[0] else -1.0
    return out


def _config_doc(cfg: problem.Config) -> dict:
    return {"cells": cfg.cells, "dt_factor": round(cfg.dt_factor, 6), "order": cfg.order,
            "derivation": [list(s) for s in cfg.derivation.steps]}


class CssService(BusService):
    name = "css"
    capacity = 2

    async def handle(self, ctx: Context, payload: Any) -> Any:
        req = parse_request(payload)
        assert self.client is not None
        constraints, cfg = req["constraints"], req["start"]
        funder = Funder([c.name for c in constraints] + ["units"], req["actions"], req["policy"], problem.run_cost)
        job = ctx.job or "default"
        events: list[dict] = []
        compute, runs, rounds, stopped = 0, 0, [], "max_rounds"
        remaining = math.inf

        async def fund_run(cfg: problem.Config) -> str | None:
            """Hold the run's predicted cost (the budget check before the run); the reservation
            id, or None when the job cannot fund it."""
            try:
                out = await self.client.call(P.MMI_GATE_RESERVE, {"job": job, "resource": req["resource"],
                                                                  "amount": problem.run_cost(cfg), "commit": False,
                                                                  "lease_s": HOLD_LEASE_S}, retries=0)
            except (errors.Refused, errors.BudgetExceeded):
                return None
            return out["reservation"]

        async def settle(hold: str, done: int) -> int:
            """Charge exactly the cell updates the run did (the prediction assumes a fixed step;
            the stable step changes as the flow evolves): the hold is returned and the actual
            count committed.  Returns what was charged (less than ``done`` only when the job's
            budget ran out meanwhile)."""
            nonlocal remaining
            try:
                await self.client.call(P.MMI_GATE_RELEASE, {"reservation": hold}, retries=0)
            except errors.Refused:
                pass  # the lease lapsed: the hold is already back
            try:
                out = await self.client.call(P.MMI_GATE_RESERVE, {"job": job, "resource": req["resource"],
                                                                  "amount": done, "commit": True, "up_to": True},
                                             retries=0)
            except (errors.Refused, errors.BudgetExceeded):
                return 0
            if out.get("remaining") is not None:
                remaining = float(out["remaining"])
            return int(out.get("granted", out.get("committed", done)))

        hold = await fund_run(cfg)
        if hold is None:
            raise errors.Refused(f"the job's {req['resource']} cannot fund even the first measurement")
        measured, cost = await asyncio.to_thread(problem.measure, cfg)
        charged = await settle(hold, cost)
        compute, runs = compute + cost, runs + 1
        slacks = slacks_of(constraints, measured, cfg)
        for i in range(req["max_rounds"]):
            await ctx.checkpoint()
            batch = funder.plan(slacks, cfg, remaining)
            if not batch:
                stopped = "satisfied" if all(v >= 0 for v in slacks.values()) else "no_action"
                break
            predicted = funder.predict_batch(batch, slacks, cfg)
            nxt = cfg
            for name in batch:
                nxt = problem.apply(name, nxt)
            if any(problem.needs_run(n) for n in batch):
                hold = await fund_run(nxt)
                if hold is None:
                    stopped = "budget_spent"
                    break
                measured, cost = await asyncio.to_thread(problem.measure, nxt)
                charged += await settle(hold, cost)
                compute, runs = compute + cost, runs + 1
            else:
                cost = 0
            cfg = nxt
            after = slacks_of(constraints, measured, cfg)
            funder.observe(batch, slacks, predicted, after)
            row = {"round": i, "fund": batch, "before": _r(slacks), "predicted": _r(predicted), "after": _r(after),
                   "cost": cost, "compute": compute}
            rounds.append(row)
            events.append({"ev": "fund", **row})
            slacks = after
            await ctx.partial(row)
            if len(events) >= 64:
                await self._audit(events)
        await self._audit(events)
        return {"satisfied": all(v >= 0 for v in slacks.values()), "stopped": stopped, "slacks": _r(slacks),
                "rounds": rounds, "compute": compute, "charged": charged, "runs": runs, "state": _config_doc(cfg),
                "policy": req["policy"]}

    async def _audit(self, events: list[dict]) -> None:
        if events:
            assert self.client is not None
            await self.client.call(P.MMI_AUDIT, {"source": "css", "events": list(events)}, retries=0)
            events.clear()


def _r(d: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if math.isfinite(v) else (1e30 if v > 0 else -1e30)) for k, v in d.items()}



