"""Management calls (``mmi.*``): one handler per operation of :data:`kernel.protocol.MMI_OPS`.

The router answers every ``mmi.*`` request through :meth:`Management.handle`: it looks the
operation up in the protocol table (an unknown name is answered ``501``), validates the argument
against the operation's schema (:func:`kernel.protocol.check_args`: a bad argument is answered
``bad_request`` naming the field) and calls the operation's handler, ``op_<name>`` with the dots
of the name after ``mmi.`` turned into underscores.  A handler returns the answer, or a
:class:`kernel.errors.RecaError` to answer with, or None when this kernel does not serve the
operation (no ledger, no supervisor): that is answered ``501`` too.

Who may call what is declared in the table (``authority``: the least role; ``scope``: what a
caller below operator may touch) and enforced here: :meth:`Management.handle` refuses a caller
whose role ranks below the operation's authority, and each handler of an ``own``-scoped
operation checks ownership (kernel.admission's ``may_act``).  A refusal is answered
``forbidden`` and recorded in the decision log; where the answer would reveal that another
principal's request or reservation exists, the caller gets the answer for one that does not
(and the refusal is still recorded).  docs/security.md has the rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Protocol

from kernel import errors
from kernel import protocol as P
from kernel.ledger import DEFAULT_JOB, ROOT, is_default_job, refusal
from kernel.policy import Core as Router
from kernel.policy import Order
from kernel.quotas import RateQuota
from kernel.principal import LOCAL_OPERATOR, Principal

if TYPE_CHECKING:
    from kernel.admission import BudgetAdmission

__all__ = ["Caller", "Management", "ProcessControl", "handler_name", "role_of"]

log = logging.getLogger("reca.kernel")


class ProcessControl(Protocol):
    """The hard controls of preemption the management calls use (kernel.supervisor's Supervisor
    implements it).  Each raises LookupError for a child that is unknown or not running."""

    def suspend(self, name: str) -> int: ...

    def resume(self, name: str) -> int: ...

    def set_nice(self, name: str, nice: int) -> int: ...

    def set_affinity(self, name: str, cpus: list[int]) -> int: ...

    def restart(self, name: str) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a management call: its ROUTER identity and its verified principal."""

    identity: bytes = b""
    principal: Principal = LOCAL_OPERATOR


Handler = Callable[["Router", dict[str, Any], float, Caller], Any]

def role_of(principal: Principal) -> P.Role:
    """The roles table's row of a principal's role."""
    return principal.kind


def _loggable(arg: Any) -> dict[str, Any]:
    """A refused call's argument as the decision log records it (small, JSON)."""
    if not isinstance(arg, dict):
        return {}
    out = {}
    for k, v in list(arg.items())[:8]:
        if isinstance(v, bytes):
            v = v.hex()
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[str(k)] = v if not isinstance(v, str) else v[:200]
    return out


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
        #: Management calls per principal below operator (issue 24).
        self.calls = RateQuota(P.MMI_CALLS_PER_S * 60.0, burst=P.MMI_CALLS_PER_S)

    def handle(self, router: "Router", name: str, arg: Any, now: float, caller: Caller = Caller()) -> Any:
        """Answer the management call ``name`` from ``caller``."""
        spec = P.MMI_OPS.get(name)
        if spec is None:
            return None
        if not caller.principal.operator and not self.calls.take(caller.principal.name, now)[0]:
            return errors.Overloaded(f"{name}: {caller.principal.name} sends more than {P.MMI_CALLS_PER_S} "
                                     "management calls a second; retry later")
        if role_of(caller.principal).rank < spec.authority.rank:
            return self.forbid(router, caller, name, arg, now,
                               f"{name} needs the {spec.authority} role; {caller.principal.name} is "
                               f"{caller.principal.role}")
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
        except errors.RecaError as exc:
            return exc
        except Exception:
            # The argument passed its schema: what the handler raised is the kernel's bug, not
            # the caller's; say so, and keep the traceback for the operator.
            log.exception("internal error in the handler of %s", name)
            return errors.InternalError(f"{name}: internal error in the kernel (logged)")

    # -- helpers ----------------------------------------------------------------------------------

    def forbid(self, router: "Router", caller: Caller, name: str, arg: Any, now: float, message: str,
               answer: errors.RecaError | None = None) -> errors.RecaError:
        """Record a refused call and return its answer (``forbidden``, or ``answer``: what a
        caller gets where ``forbidden`` would reveal that something of another principal exists)."""
        if self.budget is not None:
            self.budget.on_forbidden(caller.principal, name, _loggable(arg), now)
        return answer if answer is not None else errors.Forbidden(message)

    def _may_act(self, router: "Router", caller: Caller, job: Any) -> bool:
        assert self.budget is not None
        return isinstance(job, str) and self.budget.may_act(router, caller.principal, job)

    def _not_yours(self, router: "Router", caller: Caller, name: str, arg: dict[str, Any], now: float, job: Any) -> Any:
        assert self.budget is not None
        return self.forbid(router, caller, name, arg, now, "", self.budget.not_yours(job))

    def _holder_ok(self, router: "Router", caller: Caller, reservation: str) -> bool:
        """Whether ``caller`` may commit, release or renew ``reservation``: an operator, the
        principal that took it, or one that may act in its job.  (Unknown ids: True; the ledger
        answers them ``unknown``.)"""
        assert self.budget is not None
        held = self.budget.ledger.reservation_of(reservation)
        if held is None or caller.principal.operator:
            return True
        job, holder = held
        return holder == caller.principal.name or job != DEFAULT_JOB and self._may_act(router, caller, job)

    def _decide(self, router: "Router", op: str, now: float, **inputs: Any) -> Any:
        """A ledger decision, answered as its outputs or as the typed error it refused with;
        jobs it exhausted are cancelled at once."""
        budget = self.budget
        assert budget is not None
        down = budget.unwritable()
        if down is not None:
            return down
        out = budget.decide(op, now, **inputs)
        for job in out.get("exhausted", ()):
            router.apply(budget.exhaust(router, job, now), now)
        refused = refusal(out)
        return refused if refused is not None else out

    # -- RFC 8/MMI --------------------------------------------------------------------------------

    def op_service(self, router: "Router", arg: Any, now: float, caller: Caller) -> Any:
        if isinstance(arg, str):
            arg = arg.encode()
        return P.MMI_OK if isinstance(arg, bytes) and router.has_worker(arg) else P.MMI_NOT_FOUND

    def op_stats(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        if caller.principal.operator:
            return self._operator_stats(router, arg or {}, now)
        return self._principal_stats(router, arg or {}, now, caller)

    @staticmethod
    def _jobs_page(query: dict[str, Any]) -> int:
        page = query.get("jobs_page", 0)
        return page if isinstance(page, int) and not isinstance(page, bool) and page >= 0 else 0

    def _operator_stats(self, router: "Router", query: dict[str, Any], now: float) -> dict[str, Any]:
        """``mmi.stats`` for an operator: everything, with one page of services and one page of
        jobs (``jobs_page``; the admission's section holds page 0): its cost is a page, whatever
        the ledger holds (issue 24)."""
        out = router.stats(now, query)
        if self.budget is None:
            return out
        page, ledger = self._jobs_page(query), self.budget.ledger
        if page:
            out["jobs"] = ledger.snapshot(now, skip=page * P.STATS_PAGE, limit=P.STATS_PAGE)
        summary = out.setdefault("summary", {})
        summary["jobs"] = len(ledger.jobs)
        summary["jobs_page"] = page
        summary["jobs_pages"] = -(-len(ledger.jobs) // P.STATS_PAGE)
        return out

    def _principal_stats(self, router: "Router", query: dict[str, Any], now: float, caller: Caller) -> dict[str, Any]:
        """``mmi.stats`` below operator (issue 24): the caller's own jobs, and one page of services
        -- for a client by name and health only; for a service key (which places work on the
        others: cpcs) with their figures and the workers' capacities -- never a pid, another
        principal's job, the supervisor's children or the kernel's counters.  Costs the page and
        the caller's own jobs, not the whole ledger."""
        out = router.principal_stats(now, query, figures=bool(caller.principal.services))
        if self.budget is not None:
            self.budget.flush_log()
            page = self._jobs_page(query)
            ledger = self.budget.ledger
            out["jobs"] = ledger.snapshot(now, owner=caller.principal.name, skip=page * P.STATS_PAGE,
                                          limit=P.STATS_PAGE)
            owned = ledger.jobs_of(caller.principal.name)
            out["summary"]["jobs"] = owned
            out["summary"]["jobs_page"] = page
            out["summary"]["jobs_pages"] = -(-owned // P.STATS_PAGE)
        return out

    # -- jobs -------------------------------------------------------------------------------------

    def op_job_open(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        if self.budget is None:
            return None
        parent = arg.get("parent")
        if is_default_job(arg["job"]):
            # root, default and default:<name> are the kernel's (a client that opened
            # default:<name> first would lock <name> out of its own default job).
            return errors.BadRequest(f"{P.MMI_JOB_OPEN}: job name {arg['job']!r} is reserved for the kernel")
        if parent not in (None, ROOT) and not self._may_act(router, caller, parent):
            # Carving: only from one's own jobs (the shared default job: operators only).
            return self._not_yours(router, caller, P.MMI_JOB_OPEN, arg, now, parent)
        if not caller.principal.operator \
                and self.budget.ledger.jobs_of(caller.principal.name) >= P.MAX_JOBS_PER_PRINCIPAL:
            return errors.Refused(f"{P.MMI_JOB_OPEN}: {caller.principal.name} has {P.MAX_JOBS_PER_PRINCIPAL} "
                                  "open jobs, the most a principal may own; close some first")
        if parent in (None, ROOT) and not caller.principal.operator:
            # A non-operator's top-level jobs are carved from its own default job, so all it holds
            # is bounded by [limits] default: no client can take root's budget from the others.
            parent, refused = self.budget.resolve_job(caller.principal, None, now)
            if refused is not None:
                return refused
        limits = arg.get("budget") or arg.get("limits")
        owner = self.budget.ledger.owner_of(parent) if isinstance(parent, str) else None
        owner = owner or caller.principal.name
        held, bound = self.budget.ledger.kinds_of(owner), self.budget.ledger.max_kinds
        if not caller.principal.operator and isinstance(limits, dict) and held + len(limits) > bound:
            return errors.Refused(f"{P.MMI_JOB_OPEN}: {owner}'s open jobs hold {held} budget kinds; "
                                  f"{len(limits)} more would pass the bound of {bound} per "
                                  "principal; close some jobs first", quota="kinds")
        for kind in limits if isinstance(limits, dict) else ():
            typo = P.budget_kind_typo(kind) if isinstance(kind, str) else None
            if typo is not None:  # any other name is a counted resource: a misspelt kind limits nothing
                return errors.BadRequest(
                    f"{P.MMI_JOB_OPEN}: budget kind {kind!r} is not a kind (did you mean {typo!r}?); kinds: "
                    f"{', '.join(P.BUDGET_KINDS)}; any other name is a counted resource", kind="budget_kind")
        return self._decide(router, "open", now, job=arg.get("job"), parent=parent,
                            limits=limits, priority=arg["priority"],
                            owner=caller.principal.name)

    def op_job_close(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        if self.budget is None:
            return None
        job = arg.get("job")
        if not self._may_act(router, caller, job):
            return self._not_yours(router, caller, P.MMI_JOB_CLOSE, arg, now, job)
        if isinstance(job, str) and is_default_job(job) and not caller.principal.operator:
            # closing and re-opening one's default job would refill it: only an operator may
            return errors.Refused(f"{P.MMI_JOB_CLOSE}: a default job is closed only by an operator")
        return self._decide(router, "close", now, job=job)

    def op_job_stats(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        if self.budget is None:
            return None
        job = arg.get("job")
        if not job:  # one page of the caller's jobs (an operator: of every job), in the ledger's order
            page = arg.get("page", 0)
            page = page if isinstance(page, int) and not isinstance(page, bool) and page >= 0 else 0
            return self.budget.ledger.snapshot(now, owner=None if caller.principal.operator else caller.principal.name,
                                               skip=page * P.STATS_PAGE, limit=P.STATS_PAGE)
        snap = self.budget.ledger.snapshot(now, owner=None if caller.principal.operator else caller.principal.name,
                                           names=[job])
        if job not in snap and not caller.principal.operator:
            return self.budget.not_yours(job)
        return snap.get(job, errors.Refused(f"unknown job {job!r}"))

    # -- gates ------------------------------------------------------------------------------------

    def op_gate_reserve(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        if self.budget is None:
            return None
        job, refused = self.budget.resolve_job(caller.principal, arg.get("job"), now)
        if refused is not None:
            return refused
        if not self._may_act(router, caller, job):
            return self._not_yours(router, caller, P.MMI_GATE_RESERVE, arg, now, job)
        if not arg["commit"] and not caller.principal.operator \
                and self.budget.ledger.held_by[caller.principal.name] >= P.MAX_HELD_PER_PRINCIPAL:
            return errors.Refused(f"{P.MMI_GATE_RESERVE}: {caller.principal.name} holds "
                                  f"{P.MAX_HELD_PER_PRINCIPAL} reservations, the most a principal may hold; "
                                  "release or commit some first")
        # Reservation ids are random (unguessable) and recorded as an input (replay is exact).
        extra: dict[str, Any] = {"holder": caller.principal.name}
        if not arg["commit"]:
            extra["reservation"] = f"{self.budget.ledger.session}{self.budget.host.token(16).hex()}"
        if "lease_s" in arg:
            extra["lease"] = arg["lease_s"]
        if arg["up_to"]:
            extra["up_to"] = True  # only when asked: older logs replay unchanged
        return self._decide(router, "reserve", now, job=job, resource=arg["resource"],
                            amount=arg["amount"], commit=arg["commit"], **extra)

    def _settle(self, router: "Router", name: str, op: str, arg: dict[str, Any], now: float, caller: Caller) -> Any:
        """commit / release: another principal's reservation is answered as an unknown one."""
        if self.budget is None:
            return None
        rid = arg["reservation"]
        if not self._holder_ok(router, caller, rid):
            return self.forbid(router, caller, name, arg, now, "",
                               errors.Refused(f"unknown or expired reservation {rid!r}"))
        return self._decide(router, op, now, reservation=rid)

    def op_gate_commit(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._settle(router, P.MMI_GATE_COMMIT, "commit", arg, now, caller)

    def op_gate_release(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._settle(router, P.MMI_GATE_RELEASE, "release", arg, now, caller)

    def op_gate_renew(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        """Another principal's reservations are listed ``unknown``, as ids that are not held."""
        if self.budget is None:
            return None
        ids = list(dict.fromkeys(arg["reservations"]))  # one id listed many times is renewed (and logged) once
        theirs = [rid for rid in ids if not self._holder_ok(router, caller, rid)]
        if theirs:
            self.forbid(router, caller, P.MMI_GATE_RENEW, {"reservations": len(theirs)}, now, "")
            ids = [rid for rid in ids if rid not in theirs]
        out = self._decide(router, "renew", now, reservations=ids, lease=arg["lease_s"])
        if theirs and isinstance(out, dict):
            out = {**out, "unknown": out["unknown"] + theirs}
        return out

    # -- audit ------------------------------------------------------------------------------------

    def op_audit(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        """A service appends its own decisions (maps) to the kernel's decision log, so one log
        holds every decision of the runtime.  Replay lists them (they are the service's
        decisions, not the ledger's).  Only under the caller's own sources (operators: any),
        at most MAX_AUDIT_BYTES per call and the audit quota per principal per minute."""
        budget = self.budget
        source, events = arg["source"], arg["events"]
        if not caller.principal.may_audit(source):
            return self.forbid(router, caller, P.MMI_AUDIT, {"source": source}, now,
                               f"{caller.principal.name} may not write audit records as {source!r}")
        if budget is None or budget.log is None:
            return {"ok": True, "logged": 0}
        down = budget.unwritable()
        if down is not None:
            return down
        try:  # all or nothing: a batch that cannot be written is refused before any line is
            size = len(json.dumps(events, default=str))
        except (TypeError, ValueError, RecursionError) as exc:
            return errors.BadRequest(f"{P.MMI_AUDIT}: events must be plain data: {exc}")
        if size > P.MAX_AUDIT_BYTES:
            return errors.BadRequest(f"{P.MMI_AUDIT}: events are {size} bytes of JSON; at most "
                                     f"{P.MAX_AUDIT_BYTES} bytes per call")
        if not caller.principal.operator and not budget.audit_bytes.take(caller.principal.name, now, size)[0]:
            budget.record_limited(caller.principal, "audit_refused", now,
                                  {"source": source, "bytes": size, "principal": caller.principal.name}, {"ok": False})
            return errors.Refused(f"{P.MMI_AUDIT}: audit quota of {P.AUDIT_BYTES_PER_MIN} bytes per minute "
                                  f"reached for {caller.principal.name}; retry later")
        if not budget.audit_allowance(caller.principal, len(events), now):
            budget.record_limited(caller.principal, "audit_refused", now,
                                  {"source": source, "events": len(events), "principal": caller.principal.name},
                                  {"ok": False})
            return errors.Refused(f"{P.MMI_AUDIT}: audit quota of {budget.audit_quota} records per minute "
                                  f"reached for {caller.principal.name}; retry later")
        for event in events:
            budget.record("audit", now, {"source": source, "event": event}, {"ok": True})
        budget.flush_log()  # the caller advances its high-water mark on this answer
        return {"ok": True, "logged": len(events)}

    # -- orders: preempt, resume, cancel, control -------------------------------------------------

    def _order(self, router: "Router", name: str, arg: dict[str, Any], now: float, caller: Caller) -> Any:
        """One target: ``token`` (a request's kernel token, bytes or hex: exact), ``job`` (every
        request of the job) or ``id`` (a request id of the *caller's own* requests in flight: ids
        are chosen by clients, so they only name a request together with the client that sent
        it).  Published on the control bus; the workers act at safe points.

        Below operator: a job must be the caller's own (the shared default job: operators only);
        a token must name a request the caller sent, or one of a job it may act in (its own, or
        one it serves a request of); any other is answered as a token that does not exist."""
        op = name[len(P.MMI_PREFIX):]
        service = arg["service"]
        operator = caller.principal.operator
        if P.C_JOB in arg:
            job = arg[P.C_JOB]
            if not operator and (job == DEFAULT_JOB or not self._may_act(router, caller, job)):
                return self._not_yours(router, caller, name, arg, now, job)
            known = self.budget.ledger.jobs.get(job) if self.budget is not None else True
            if known is None or getattr(known, "closed", False):
                return errors.NotFound(f"{name}: no open job {job!r}")  # an order to nothing is no success
            unknown = self._unknown_service(router, name, service)
            if unknown is not None:
                return unknown
            # Only the services holding requests of the job hear its name (never ctl/all: every
            # service key may read that); workers act on requests they hold, so a job with
            # nothing in flight is an order to nothing (docs/protocol.md).
            reqs = [r for r in router.inflight.values() if not r.done and r.job == job
                    and (service == P.CTL_ALL or r.service.name == service.encode())]
            if not reqs:
                where = "" if service == P.CTL_ALL else f" at {service!r}"
                return errors.NotFound(f"{name}: no request of job {job!r} in flight{where}")
            orders = [Order(s, op, {P.C_JOB: job}) for s in sorted({r.service.text for r in reqs})]
            for order in orders:
                router.order(order, now)
            return {"ok": True, "targets": len(reqs)}
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
                if found is not None and not operator and found.principal != caller.principal \
                        and not (found.job and self._may_act(router, caller, found.job)):
                    # Neither its sender, nor its job's owner, nor a service serving that job
                    # (ids pauses a caller's decode that way).
                    self.forbid(router, caller, name, arg, now, "")
                    candidates = []  # answered exactly as a token that does not exist
            else:
                candidates = [r for r in router.inflight.values()
                              if r.client == caller.identity and r.principal == caller.principal
                              and r.rid == arg[P.C_ID]]
            reqs = [r for r in candidates
                    if not r.done and (service == P.CTL_ALL or r.service.name == service.encode())]
            if not reqs:
                what = "that token" if P.C_TOKEN in arg else f"id {arg[P.C_ID]!r} from this client"
                return errors.NotFound(f"{name}: no request with {what} in flight")
            orders = [Order.to_request(op, r) for r in reqs]
        for order in orders:
            router.order(order, now)
        return {"ok": True, "targets": len(orders)}

    @staticmethod
    def _unknown_service(router: "Router", name: str, service: str) -> errors.NotFound | None:
        """``not_found`` for an order addressed to a service no live worker serves (an order to
        nothing is no success); None for ``all`` or a served service."""
        if service == P.CTL_ALL or router.has_worker(service.encode()):
            return None
        return errors.NotFound(f"{name}: no worker serves {service!r}")

    def op_preempt(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._order(router, P.MMI_PREEMPT, arg, now, caller)

    def op_resume(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._order(router, P.MMI_RESUME, arg, now, caller)

    def op_cancel(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._order(router, P.MMI_CANCEL, arg, now, caller)

    def op_control(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        """Orders that are not the kernel's own decisions (fidelity, precision) are relayed on the
        control bus; preempt/resume/cancel stay with their own operations.  A service the kernel
        does not know is ``not_found``."""
        unknown = self._unknown_service(router, P.MMI_CONTROL, arg["service"])
        if unknown is not None:
            return unknown
        router.order(Order(arg["service"], arg["op"], arg["message"]), now)
        return {"ok": True}

    # -- process control (through the supervisor) -------------------------------------------------

    def _proc(self, name: str, arg: dict[str, Any], now: float, act: Callable[["ProcessControl"], int]) -> Any:
        if self.procs is None:
            return errors.BadRequest(f"{name} needs 'child' (a supervised child name)")
        try:
            pid = act(self.procs)
        except LookupError as exc:
            return errors.Refused(str(exc))
        except (OSError, ValueError, OverflowError) as exc:  # the OS refused the value (a CPU number, ...)
            return errors.BadRequest(f"{name}: {exc}")
        if self.budget is not None:
            self.budget.record(name[len(P.MMI_PREFIX):], now, dict(arg), {"ok": True, "pid": pid})
        return {"ok": True, "pid": pid}

    def op_restart(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        if self.procs is None:
            return None
        try:
            restarts = self.procs.restart(arg["child"])
        except LookupError as exc:
            return errors.Refused(str(exc))
        if self.budget is not None:
            self.budget.record("restart", now, dict(arg), {"ok": True, "restarts": restarts})
        return {"ok": True, "child": arg["child"], "restarts": restarts}

    def op_proc_stop(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._proc(P.MMI_PROC_STOP, arg, now, lambda p: p.suspend(arg["child"]))

    def op_proc_cont(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._proc(P.MMI_PROC_CONT, arg, now, lambda p: p.resume(arg["child"]))

    def op_proc_nice(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._proc(P.MMI_PROC_NICE, arg, now, lambda p: p.set_nice(arg["child"], arg["nice"]))

    def op_proc_affinity(self, router: "Router", arg: dict[str, Any], now: float, caller: Caller) -> Any:
        return self._proc(P.MMI_PROC_AFFINITY, arg, now, lambda p: p.set_affinity(arg["child"], arg["cpus"]))
