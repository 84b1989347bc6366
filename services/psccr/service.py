"""``psccr``: checkpointed derivations through the kernel.

Op ``{"op": "derive", "start", "var", "steps": [{op, arg?}], "mode": "checkpoint", "faults": []}``
runs :func:`services.psccr.logic.derive`: the heavy steps (``integrate``, ``simplify``) are calls
to the ``scch`` service's ``solve`` (``cache: false``) in the caller's job, so the kernel charges
and bounds them like any call; the light steps (``diff``, ``expand``, ``subs``) run here.
``faults`` injects a wrong first result at the given step indices (for tests and benchmarks).  A
safe point (``ctx.checkpoint()``) sits between steps.  Checkpoints persist in ``--db`` (SQLite,
WAL), so a cousin derivation in a later request grafts what an earlier one verified.
Op ``{"op": "stats"}``: the number of stored continuations.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import sympy as sp

from kernel import errors
from reason import canon as C
from reason.errors import ReasonError
from services.base import Context
from services.common import BusService
from services.psccr.logic import Checkpoints, compute_local, derive

#: Steps sent to the solver service (through the kernel, budgeted); the rest run here.
HEAVY = {"integrate": "integrate", "simplify": "simplify"}


class PsccrService(BusService):
    name = "psccr"
    capacity = 1
    call_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.db = ":memory:"
        self.solver = "scch"
        self.store: Checkpoints | None = None
        self.rng = np.random.default_rng()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--db", default=":memory:", help="checkpoint store (SQLite, WAL)")
        parser.add_argument("--solver-service", default="scch")

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        self.db, self.solver = args.db, args.solver_service

    async def setup(self) -> None:
        await super().setup()
        self.store = Checkpoints(self.db)

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("psccr takes a map {op, ...}; ops: derive, stats")
        op = payload.get("op")
        if op == "stats":
            return {"continuations": self.store.count()}
        if op != "derive":
            raise errors.BadRequest(f"unknown op {op!r}; psccr ops: derive, stats")
        faults = payload.get("faults", [])
        var = payload.get("var", "x")
        if not isinstance(faults, list) or not all(isinstance(f, int) for f in faults) or not isinstance(var, str):
            raise errors.BadRequest("faults: a list of step indices; var: a symbol name")

        async def compute(step_op: str, expr: sp.Expr, x: sp.Symbol, arg: sp.Expr | None):
            await ctx.checkpoint()
            if step_op in HEAVY:
                assert self.client is not None
                sub = {"kind": HEAVY[step_op], "expr": sp.sstr(expr)}
                if step_op == "integrate":
                    sub["var"] = x.name
                out = await self.client.call(self.solver, {"op": "solve", "subgoal": sub, "cache": False},
                                             job=ctx.job, retries=0)
                return C.parse(out["answer"], artifact=True), float(out["cpu_s"])
            return compute_local(step_op, expr, x, arg), 0.0

        try:
            out = await derive(payload.get("start"), var, payload.get("steps"), compute=compute,
                               store=self.store, faults=set(faults), mode=payload.get("mode", "checkpoint"),
                               rng=self.rng)
        except ReasonError as exc:
            raise errors.BadRequest(str(exc), kind=type(exc).__name__) from None
        return {"final": out.final, "ok": out.ok, "steps": out.steps, "computed": out.computed,
                "redone": out.redone, "failures": out.failures, "grafted": out.grafted, "cpu_s": out.cpu_s,
                "trail": out.trail}


SERVICE = PsccrService()
