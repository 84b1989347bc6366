"""``psccr``: checkpointed derivations through the kernel.

Op ``{"op": "derive", "start", "var", "steps": [{op, arg?}], "mode": "checkpoint", "faults": []}``
runs :func:`services.psccr.logic.derive`: the heavy steps (``integrate``, ``simplify``) are calls
to the ``scch`` service's ``solve`` (``cache: false``) in the caller's job, so the kernel charges
and bounds them like any call; the light steps (``diff``, ``expand``, ``subs``) run here.
``faults`` injects a wrong first result at the given step indices (for tests and benchmarks).  A
safe point (``ctx.checkpoint()``) sits between steps.  Checkpoints persist in ``--db`` (SQLite,
WAL), so a cousin derivation in a later request grafts what an earlier one verified.
Op ``{"op": "repair", "decode": id, "width": 8, "max_rounds": 8}``: RoI-S + PSC-CR on a decode
held by the ``decode`` worker (:mod:`services.psccr.chains`): while the chain verifier flags a
step, graft a verified continuation of an equivalent item from the checkpoint store (decode op
``replace``: nothing decoded), else re-decode the flagged region (decode op ``splice``, as
``rois`` does); afterwards every verified item is checkpointed.  Every decode call is charged to
the caller's job.  Returns the grafts, splices, tokens re-decoded and whether the chain verifies.
Op ``{"op": "stats"}``: the number of stored continuations.

**Principals** (issue 24): the checkpoint store is kept per principal (the kernel's word,
``ctx.principal``): a derivation grafts only what its own principal verified, and ``stats``
counts only its own continuations.  Calls to ``scch`` and ``decode`` are made for the caller
(``on_behalf``), so ``repair`` reaches only the caller's own decodes.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

import numpy as np
import sympy as sp

from kernel import errors
from reason import canon as C
from reason.check import warm_up
from reason.errors import ReasonError
from services.base import Context
from services.common import BusService
from lm import tokenizer
from lm.errors import LMError
from lm.roi import find_roi
from lm.verifier import verify
from services.psccr import chains as PC
from services.psccr.logic import Checkpoints, compute_local, derive

#: Steps sent to the solver service (through the kernel, budgeted); the rest run here.
HEAVY = {"integrate": "integrate", "simplify": "simplify"}
#: Bound of a light step run here, seconds.
LIGHT_SECONDS = 1.0


class ScopedCheckpoints:
    """One principal's view of the shared :class:`Checkpoints`: its state keys carry the
    principal's tag, so no principal reads, counts or overwrites another's continuations."""

    def __init__(self, store: Checkpoints, principal: str) -> None:
        self.store = store
        self.tag = hashlib.sha256(principal.encode("utf-8", "surrogatepass")).hexdigest()[:12] + "/"

    def get(self, state: str, step: str) -> str | None:
        return self.store.get(self.tag + state, step)

    def put(self, state: str, step: str, result: str) -> None:
        self.store.put(self.tag + state, step, result)

    def count(self) -> int:
        return self.store.db.execute("SELECT COUNT(*) FROM edges WHERE substr(state, 1, ?) = ?",
                                     (len(self.tag), self.tag)).fetchone()[0]


class PsccrService(BusService):
    name = "psccr"
    capacity = 1
    call_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.db = ":memory:"
        self.solver = "scch"
        self.decode = "decode"
        self.store: Checkpoints | None = None
        self.rng = np.random.default_rng()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--db", default=":memory:", help="checkpoint store (SQLite, WAL)")
        parser.add_argument("--solver-service", default="scch")
        parser.add_argument("--decode-service", default="decode")

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        self.db, self.solver, self.decode = args.db, args.solver_service, args.decode_service

    async def setup(self) -> None:
        await super().setup()
        self.store = Checkpoints(self.db)
        warm_up()

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict):
            raise errors.BadRequest("psccr takes a map {op, ...}; ops: derive, stats")
        op = payload.get("op")
        assert self.store is not None
        store = ScopedCheckpoints(self.store, ctx.principal)
        if op == "stats":
            return {"continuations": store.count()}
        if op == "repair":
            return await self._repair(ctx, payload, store)
        if op != "derive":
            raise errors.BadRequest(f"unknown op {op!r}; psccr ops: derive, repair, stats")
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
                                             job=ctx.job, retries=0, on_behalf=ctx.principal or None)
                return C.parse(out["answer"], artifact=True), float(out["cpu_s"])
            with C.time_limit(LIGHT_SECONDS, f"{step_op} step"):  # on the loop thread: below the liveness window
                return compute_local(step_op, expr, x, arg), 0.0

        try:
            out = await derive(payload.get("start"), var, payload.get("steps"), compute=compute,
                               store=store, faults=set(faults), mode=payload.get("mode", "checkpoint"),
                               rng=self.rng)
        except ReasonError as exc:
            raise errors.BadRequest(str(exc), kind=type(exc).__name__) from None
        return {"final": out.final, "ok": out.ok, "steps": out.steps, "computed": out.computed,
                "redone": out.redone, "failures": out.failures, "grafted": out.grafted, "cpu_s": out.cpu_s,
                "trail": out.trail}

    async def _repair(self, ctx: Context, payload: dict, store: ScopedCheckpoints) -> dict:
        did = payload.get("decode")
        width, max_rounds = payload.get("width", 8), payload.get("max_rounds", 8)
        if not isinstance(max_rounds, int) or not 1 <= max_rounds <= 16:
            raise errors.BadRequest("max_rounds must be an integer in [1, 16]")
        assert self.client is not None

        async def decode(body: dict) -> dict:
            return await self.client.call(self.decode, body, job=ctx.job, retries=0,
                                          on_behalf=ctx.principal or None)

        out = {"decode": did, "grafts": 0, "splices": 0, "decoded": 0, "ok": False}
        for _ in range(max_rounds):
            await ctx.checkpoint()
            text = (await decode({"op": "state", "decode": did}))["text"]
            report = _verify(text)
            if report.ok:
                break
            plan = PC.graft_for(report, store)
            if plan is not None:
                start, end, new = plan
                await decode({"op": "replace", "decode": did, "start": tokenizer.char_to_token(start),
                              "end": tokenizer.char_to_token(end), "text": new})
                out["grafts"] += 1
                continue
            roi = find_roi(report)
            if roi is None:
                break
            res = await decode({"op": "splice", "decode": did, "start": roi.start, "end": roi.end, "width": width,
                                "verify": True})
            out["splices"] += 1
            out["decoded"] += res["repaired"]
            if res["new_span"] == res["old_span"]:
                break
        final = _verify((await decode({"op": "state", "decode": did}))["text"])
        out["ok"] = final.ok
        out["checkpointed"] = PC.record(final, store)
        return out


def _verify(text: str):
    try:
        return verify(text)
    except LMError as exc:
        raise errors.BadRequest(str(exc), kind=type(exc).__name__) from None


SERVICE = PsccrService()
