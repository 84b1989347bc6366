"""``sparkvm``: run a reasoning tape (:mod:`spark.vm`) under a step budget the kernel enforces.

Request payload: ``{"tape": [...], "limits"?: {...}}``; the request's budget must grant
``vm_steps`` (ask for it in the header's ``budget``, or run in a job that limits it): the kernel
clamps it to what the job has left and sends the grant with the request.

How the budget is enforced, twice:

* **by the worker**: the machine's ``max_steps`` is the grant, and an instruction that does not fit
  is never executed (fault ``step_budget``; the caller gets ``budget_exceeded`` with the steps
  spent, exactly the grant at most);
* **by the kernel**: the worker reports ``vm_steps`` spent after every slice of ``--slice`` steps (a
  PARTIAL ``{"steps": n}``, which the kernel charges) and offers a safe point there.  A report past
  the grant is charged only the grant, answered ``budget_exceeded`` and the request is cancelled
  (the handler stops at its next safe point); a job whose ``vm_steps`` limit runs out is exhausted.
  ``--enforce kernel`` turns the worker's own check off (a worker that ignores its grant: what the
  benchmark and the tests use to show the kernel alone stops it, within one slice).

A tape stopped by a fault (step budget, call depth, memory, stack, arithmetic...) is billed what it
spent and recorded in the decision log (``mmi.audit``, source ``sparkvm``: tape digest, fault,
steps, grant, job), next to the kernel's own ``charge`` decisions, which replay.

Answers: ``{"status": "halted", "steps", "output", "trace", "stack", ...}``.  Errors:
``bad_request`` (``kind``: ``malformed_tape`` / ``unknown_opcode`` / ``no_step_budget``) before
anything runs; ``budget_exceeded`` (fault ``step_budget``) and ``tape_fault`` (any other fault)
with ``steps``, ``fault`` and the trace so far.

``SVC service payload`` calls another service through the bus, charged to the caller's job (only
services in ``--allow``, default ``scch,sim,echo``; each call costs ``svc_cost`` steps too).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from kernel import errors
from kernel import protocol as P
from services.base import Context
from services.common import BusService
from spark import vm

log = logging.getLogger("reca.sparkvm")

#: The kernel budget kind of the VM (a compute kind: its exhaustion stops the job).
STEPS = "vm_steps"
#: Largest step budget one tape may use, whatever the grant (bounds one request's run).
MAX_STEPS = 50_000_000
#: Steps between reports to the kernel (and safe points).
SLICE = 1024
#: Longest trace returned (entries; the VM bounds what it records).
TRACE_TAIL = 64


class TapeFault(errors.RecaError):
    """A tape stopped by a fault other than its step budget (billed what it ran)."""

    code = "tape_fault"


class SparkVM(BusService):
    name = "sparkvm"
    capacity = 2
    call_timeout = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.slice = SLICE
        self.enforce = "worker"
        self.allow: frozenset[str] = frozenset({"scch", "sim", "echo"})
        self.audit = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--slice", type=int, default=SLICE, help="steps between reports to the kernel")
        parser.add_argument(
            "--enforce",
            choices=("worker", "kernel"),
            default="worker",
            help="kernel: the worker ignores its grant (only the kernel stops a tape)",
        )
        parser.add_argument("--allow", default="scch,sim,echo", help="services SVC may call")
        parser.add_argument("--no-audit", action="store_true", help="do not record stopped tapes")

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        if args.slice < 1:
            raise SystemExit("--slice must be >= 1")
        self.slice = args.slice
        self.enforce = args.enforce
        self.allow = frozenset(s for s in args.allow.split(",") if s)
        self.audit = not args.no_audit

    def _limits(self, ctx: Context, payload: dict) -> vm.Limits:
        grant = ctx.granted.get(STEPS)
        if grant is None:
            raise errors.BadRequest(
                f"a tape needs a {STEPS!r} budget: ask for one in the request's budget "
                f"or run it in a job that limits {STEPS!r}",
                kind="no_step_budget",
            )
        steps = int(min(grant, MAX_STEPS)) if self.enforce == "worker" else MAX_STEPS
        return vm.Limits(max_steps=steps).tightened(payload.get("limits"))

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not isinstance(payload, dict) or "tape" not in payload:
            raise errors.BadRequest("payload must be a map with a 'tape'", kind="malformed_tape")
        try:
            tape = vm.parse_tape(payload["tape"])
            limits = self._limits(ctx, payload)
        except vm.TapeError as exc:
            raise errors.BadRequest(str(exc), kind=exc.code, pc=exc.pc) from None
        m = vm.Machine(tape, limits)
        reported = 0
        while True:
            status = m.run(self.slice)
            if m.steps > reported:
                ctx.charge(**{STEPS: m.steps - reported})
                reported = m.steps
            if status is vm.Status.SYSCALL:
                await self._syscall(ctx, m)
                continue
            if status is not vm.Status.READY:
                break
            await ctx.partial({"steps": m.steps})  # the kernel charges it (and may cut the run off)
            await ctx.checkpoint()  # a cancel from the kernel raises here
        result = m.result()
        result["trace"] = result["trace"][-TRACE_TAIL:]
        result["tape"] = tape.digest
        if status is vm.Status.HALTED:
            return result
        await self._audit(ctx, tape, m)
        detail = {
            "steps": m.steps,
            "fault": m.fault.value if m.fault else None,
            "trace": result["trace"],
            "tape": tape.digest,
            "max_steps": limits.max_steps,
        }
        if m.fault is vm.Fault.STEP_BUDGET:
            raise errors.BudgetExceeded(f"tape stopped at its step budget: {m.message}", **detail)
        raise TapeFault(f"tape stopped: {m.fault}: {m.message}", **detail)

    async def _syscall(self, ctx: Context, m: vm.Machine) -> None:
        call = m.syscall
        assert call is not None and self.client is not None
        if call.service not in self.allow:
            m.resume(error=f"service {call.service!r} is not callable from a tape (allowed: {sorted(self.allow)})")
            return
        await ctx.checkpoint()
        try:
            answer = await self.client.call(call.service, call.payload, job=ctx.job, retries=0)
        except errors.RecaError as exc:
            m.resume(error=f"{call.service}: {exc.code}: {exc.message}")
            return
        m.resume(answer)

    async def _audit(self, ctx: Context, tape: vm.Tape, m: vm.Machine) -> None:
        if not self.audit or self.client is None:
            return
        event = {
            "event": "tape_stopped",
            "tape": tape.digest,
            "fault": m.fault.value if m.fault else None,
            "steps": m.steps,
            "max_steps": m.limits.max_steps,
            "granted": ctx.granted.get(STEPS),
            "job": ctx.job,
            "pc": m.pc,
        }
        try:
            await self.client.call(P.MMI_AUDIT, {"source": self.name, "events": [event]}, retries=0)
        except (errors.RecaError, asyncio.TimeoutError) as exc:  # the answer does not wait on the log
            log.warning("audit of a stopped tape failed: %s", exc)
