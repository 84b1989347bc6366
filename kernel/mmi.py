"""Management calls (``mmi.*``): one handler per operation of :data:`kernel.protocol.MMI_OPS`.

The router answers every ``mmi.*`` request through :meth:`Management.handle`: it looks the
operation up in the protocol table (an unknown name is answered ``501``), validates the argument
against the operation's schema (:func:`kernel.protocol.check_args`: a bad argument is answered
``bad_request`` naming the field) and calls the operation's handler, ``op_<name>`` with the dots
of the name after ``mmi.`` turned into underscores.  A handler returns the answer, or a
:class:`kernel.errors.RecaError` to answer with, or None when this kernel does not serve the
operation (no ledger, no supervisor): that is answered ``501`` too.

Who may call what is declared in the table (``authority``, ``scope``); enforcing it is the
router's job once principals are authenticated (issue 13).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from kernel import errors
from kernel import protocol as P
from kernel.ledger import DEFAULT_JOB

if TYPE_CHECKING:
    from kernel.admission import BudgetAdmission
    from kernel.router import Router
    from kernel.supervisor import ProcessControl

Handler = Callable[["Router", dict[str, Any], float, bytes], Any]


def handler_name(op: str) -> str:
    """``mmi.gate.reserve`` -> ``op_gate_reserve``."""
    return "op_" + op[len(P.MMI_PREFIX):].replace(".", "_")


class Management:
    """The kernel's management operations.  ``budget`` (the ledger's admission) serves jobs,
    gates, audits and orders; ``procs`` (the supervisor) serves process control; without them
    those operations are answered 501."""

    def __init__(self, budget: "BudgetAdmission | None" = None, procs: "ProcessControl | None" = None) -> None:
        self.budget = budget
        self.procs = procs
        #: One handler per operation of the protocol table (Invariant: exactly its keys).
        self.handlers: dict[str, Handler] = {op: getattr(self, handler_name(op)) for op in P.MMI_OPS}

    def handle(self, router: "Router", name: str, arg: Any, now: float, caller: bytes = b"") -> Any:
        """Answer the management call ``name`` (``caller``: the client's ROUTER identity)."""
        spec = P.MMI_OPS.get(name)
        if spec is None:
            return None
        if self.budget is not None:
            self.budget.flush_log()  # management calls see a log that is current
        try:
            if spec.scalar is not None:
                args: Any = arg
            else:
                args = P.check_args(spec, arg)
                if spec.ledger_op is not None:
                    # The ledger sees its inputs exactly as the decision log records them (JSON),
                    # so replay reproduces its decisions whatever msgpack types the caller sent.
                    json.dumps(arg if isinstance(arg, dict) else {})
                    args = json.loads(json.dumps(args))
        except errors.BadRequest as exc:
            return exc
        except (TypeError, ValueError, RecursionError) as exc:
            return errors.BadRequest(f"{name}: the argument must be plain data: {exc}")
        try:
            return self.handlers[name](router, args, now, caller)
        except (TypeError, ValueError, OverflowError) as exc:
            return errors.BadRequest(f"{name}: {exc}")

    # -- helpers ----------------------------------------------------------------------------------

    def _decide(self, router: "Router", op: str, now: float, **inputs: Any) -> Any:
        """A ledger decision, answered as its outputs or as the typed error it refused with;
        jobs it exhausted are cancelled at once."""
        budget = self.budget
        assert budget is not None
        out = budget.decide(op, now, **inputs)
        for job in out.get("exhausted", ()):
            budget.exhaust(router, job, now)
        if not out.get("ok") and "code" in out:
            return errors.from_wire({"code": out["code"], "message": out.get("message", "")})
        return out

    # -- RFC 8/MMI --------------------------------------------------------------------------------

    def op_service(self, router: "Router", arg: Any, now: float, caller: bytes) -> Any:
        if isinstance(arg, str):
            arg = arg.encode()
        return P.MMI_OK if isinstance(arg, bytes) and router.has_worker(arg) else P.MMI_NOT_FOUND

    def op_stats(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return router.stats(now)

    # -- jobs -------------------------------------------------------------------------------------

    def op_job_open(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        return self._decide(router, "open", now, job=arg.get("job"), parent=arg.get("parent"),
                            limits=arg.get("budget") or arg.get("limits"), priority=int(arg["priority"]))

    def op_job_close(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        return self._decide(router, "close", now, job=arg.get("job"))

    def op_job_stats(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        snap = self.budget.ledger.snapshot(now)
        job = arg.get("job")
        return snap.get(job, errors.Refused(f"unknown job {job!r}")) if job else snap

    # -- gates ------------------------------------------------------------------------------------

    def op_gate_reserve(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        extra: dict[str, Any] = {}
        if "lease_s" in arg:
            extra["lease"] = arg["lease_s"]
        if arg["up_to"]:
            extra["up_to"] = True  # only when asked: older logs replay unchanged
        return self._decide(router, "reserve", now, job=arg.get("job", DEFAULT_JOB), resource=arg["resource"],
                            amount=arg["amount"], commit=arg["commit"], **extra)

    def op_gate_commit(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        return self._decide(router, "commit", now, reservation=arg["reservation"])

    def op_gate_release(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        return self._decide(router, "release", now, reservation=arg["reservation"])

    def op_gate_renew(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        if self.budget is None:
            return None
        return self._decide(router, "renew", now, reservations=arg["reservations"], lease=arg["lease_s"])

    # -- audit ------------------------------------------------------------------------------------

    def op_audit(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        """A service appends its own decisions (maps) to the kernel's decision log, so one log
        holds every decision of the runtime.  Replay lists them (they are the service's
        decisions, not the ledger's)."""
        budget = self.budget
        if budget is None or budget.log is None:
            return {"ok": True, "logged": 0}
        source, events = arg["source"], arg["events"]
        try:  # all or nothing: a batch that cannot be written is refused before any line is
            json.dumps(events, default=str)
        except (TypeError, ValueError, RecursionError) as exc:
            return errors.BadRequest(f"{P.MMI_AUDIT}: events must be plain data: {exc}")
        for event in events:
            budget.record("audit", now, {"source": source, "event": event}, {"ok": True})
        budget.flush_log()  # the caller advances its high-water mark on this answer
        return {"ok": True, "logged": len(events)}

    # -- orders: preempt, resume, cancel, control -------------------------------------------------

    def _order(self, router: "Router", name: str, arg: dict, now: float, caller: bytes) -> Any:
        """One target: ``token`` (a request's kernel token, bytes or hex: exact), ``job`` (every
        request of the job) or ``id`` (a request id of the *caller's own* requests in flight: ids
        are chosen by clients, so they only name a request together with the client that sent
        it).  Published on the control bus; the workers act at safe points."""
        op = name[len(P.MMI_PREFIX):]
        service = arg["service"]
        if P.C_JOB in arg:
            messages = [(service, {P.C_JOB: arg[P.C_JOB]})]
        else:
            if P.C_TOKEN in arg:
                token = arg[P.C_TOKEN]
                if isinstance(token, str):  # hex, as JSON (the CLI) can carry it
                    try:
                        token = bytes.fromhex(token)
                    except ValueError:
                        return errors.BadRequest(f"{name}: 'token' is not hex: {token!r}")
                found = router.inflight.get(token)  # the in-flight table is keyed by token
                candidates = [found] if found is not None else []
            else:
                candidates = [r for r in router.inflight.values() if r.client == caller and r.rid == arg[P.C_ID]]
            reqs = [r for r in candidates
                    if not r.done and (service == P.CTL_ALL or r.service.name == service.encode())]
            if not reqs:
                what = "that token" if P.C_TOKEN in arg else f"id {arg[P.C_ID]!r} from this client"
                return errors.Refused(f"{name}: no request with {what} in flight")
            messages = [(r.service.name.decode(errors="replace"), {P.C_TOKEN: r.token, P.C_ID: r.rid}) for r in reqs]
        for topic_service, message in messages:
            if self.budget is not None:
                self.budget.record(op, now, {k: (v.hex() if isinstance(v, bytes) else v) for k, v in message.items()},
                                   {"ok": True})
            router.publish(P.control_topic(topic_service, op), message)
        return {"ok": True, "targets": len(messages)}

    def op_preempt(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._order(router, P.MMI_PREEMPT, arg, now, caller)

    def op_resume(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._order(router, P.MMI_RESUME, arg, now, caller)

    def op_cancel(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._order(router, P.MMI_CANCEL, arg, now, caller)

    def op_control(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        """Orders that are not the kernel's own decisions (fidelity, precision) are relayed on the
        control bus; preempt/resume/cancel stay with their own operations."""
        op, service = arg["op"], arg["service"]
        if self.budget is not None:
            self.budget.record(op, now, {"service": service}, {"ok": True})
        router.publish(P.control_topic(service, op), arg["message"])
        return {"ok": True}

    # -- process control (through the supervisor) -------------------------------------------------

    def _proc(self, name: str, arg: dict, now: float, act: Callable[["ProcessControl"], int]) -> Any:
        if self.procs is None:
            return errors.BadRequest(f"{name} needs 'child' (a supervised child name)")
        try:
            pid = act(self.procs)
        except LookupError as exc:
            return errors.Refused(str(exc))
        except OSError as exc:
            return errors.BadRequest(f"{name}: {exc}")
        if self.budget is not None:
            self.budget.record(name[len(P.MMI_PREFIX):], now, dict(arg), {"ok": True, "pid": pid})
        return {"ok": True, "pid": pid}

    def op_proc_stop(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._proc(P.MMI_PROC_STOP, arg, now, lambda p: p.suspend(arg["child"]))

    def op_proc_cont(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._proc(P.MMI_PROC_CONT, arg, now, lambda p: p.resume(arg["child"]))

    def op_proc_nice(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._proc(P.MMI_PROC_NICE, arg, now, lambda p: p.set_nice(arg["child"], arg["nice"]))

    def op_proc_affinity(self, router: "Router", arg: dict, now: float, caller: bytes) -> Any:
        return self._proc(P.MMI_PROC_AFFINITY, arg, now, lambda p: p.set_affinity(arg["child"], arg["cpus"]))
