"""Admission: the policy that enforces the Ledger.

:class:`BudgetAdmission` plugs the pure :class:`kernel.ledger.Ledger` into the router as a
:class:`kernel.policy.Admission`: admission with clamping, charging from worker statuses and
kernel measurements, exhaustion with cancel, and priority preemption.  It reads the router
through a :class:`kernel.policy.View` and answers with effects (:class:`Fail`, :class:`Lend`,
:class:`Order`) the router applies; it never calls the router.  CPU times come through the host
port (kernel.host).  Every ledger operation goes through :meth:`BudgetAdmission.decide`, which
records it in the decision log (a :class:`Journal`: kernel.decisions).  The management calls that
drive the ledger (jobs, gates, orders) are kernel.mmi's.

Where charging happens: :meth:`BudgetAdmission.admit` (the ledger's ``admit``: clamps the budget,
starts the request), :meth:`BudgetAdmission.on_partial` and :meth:`settle` (``charge`` from the
worker's status, CPU time measured by the kernel replacing the reported one), and ``finish`` when
the request is done; wall time accrues in the ledger between start and finish.

Invariants (:meth:`BudgetAdmission.check_invariants`): ``_paused_at`` holds exactly the tracks
with ``paused_at`` set; ``paused_count`` is the number of tracks with ``paused``; ``prio_counts``
counts the tracks by priority; every track is of a request the router has in flight; no track is
charged above what it was granted (a worker's report is capped at the grant).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from kernel import codec, errors
from kernel import protocol as P
from kernel.dedup import Dedup
from kernel.ledger import COMPUTE, DEFAULT_JOB, ROOT, Job, Ledger, is_default_job, refusal
from kernel.policy import NO_EFFECTS, Admission, Effect, Effects, Fail, Lend, Order, View, forward_with, forwarded_header
from kernel.principal import LOCAL_OPERATOR, Principal
from kernel.protocol import ErrorCode
from kernel.quotas import RateQuota
from kernel.state import Request, Worker

if TYPE_CHECKING:
    from kernel.host import Host

__all__ = ["BudgetAdmission", "Journal"]

log = logging.getLogger("reca.ledger")


class Journal(Protocol):
    """Where decisions are recorded (kernel.decisions.DecisionLog)."""

    session: str
    state: Callable[[], dict[str, Any]] | None

    def append(self, op: str, now: float, inputs: dict[str, Any], outputs: dict[str, Any]) -> None: ...

    def flush(self) -> bool | None: ...  # DecisionLog: False while a write fails (``error`` says why)


class _Track:
    """Per-request ledger state kept by BudgetAdmission.  A plain class whose rarely set fields are
    class-level defaults (an instance attribute shadows one once set): a request stores only the
    five it always has, cheaper to build per request than a slots dataclass storing all fifteen."""

    started: bool = False
    preempted: bool = False
    paused: bool = False  # paused by kernel preemption with its slot lent out
    paused_at: float | None = None  # when its worker reported it paused (any reason); None: running
    cpu_start: float | None = None  # worker CPU seconds at dispatch (jobs with a cpu_ms limit)
    #: Whether the kernel measures this request's CPU time: its cpu_ms is limited by a job below
    #: root and the default jobs (two /proc reads per request; see docs/budgets.md).
    measure_cpu: bool = False
    over: bool = False  # the worker reported more than was granted
    ran: bool = False  # dispatched with a logged ``run`` mark (its ``ran`` follows when done)
    #: Waiting in its service's queue: its wall time does not count (ledger ``queue``/``dispatch``).
    waiting: bool = False
    #: Paused by its owner and its slot given back (``paused`` is set too); only its owner's
    #: resume (or max_pause) runs it again, never a freed slot.
    given_back: bool = False

    def __init__(self, job: str, granted: dict[str, Any], priority: int = 0,
                 idem: tuple[str, str] | None = None) -> None:
        self.job = job
        self.granted = granted
        self.charged: dict[str, Any] = {}
        self.priority = priority
        self.idem = idem  # the request's (principal, idempotency key)

    def __repr__(self) -> str:
        return f"_Track({self.job!r}, {vars(self)})"


#: How long a request its owner paused keeps its slot while others queue, seconds (default).
PAUSE_SLOT_S = 1.0


class BudgetAdmission(Admission):
    """Router hooks that enforce the Ledger: admission with clamping, charging from worker
    statuses and kernel measurements, exhaustion with cancel, gates over MMI, preemption."""

    def __init__(self, ledger: Ledger | None = None, decision_log: Journal | None = None, *,
                 root_limits: dict[str, Any] | None = None, default_limits: dict[str, Any] | None = None,
                 max_pause: float = P.MAX_PAUSE, audit_quota: int = P.AUDIT_EVENTS_PER_MIN,
                 restored: Any = None, restored_at: float | None = None, host: "Host | None" = None,
                 weights: dict[str, float] | None = None, pause_slot: float = PAUSE_SLOT_S) -> None:
        if host is None:
            from kernel.host import SystemHost  # the real machine unless one is injected

            host = SystemHost()
        self.host: Host = host
        #: principal -> weight in the fair share of slots (kernel.fairq, [enforce] weights).
        self.weights = dict(weights or {})
        self.ledger = ledger or Ledger(session=decision_log.session if decision_log is not None
                                       else f"{host.token(4).hex()}.")
        self.log = decision_log
        #: Limits of each default job (the shared ``default`` and a non-operator's own).
        self.default_limits = dict(default_limits or {})
        #: The longest a request may stay paused before the kernel resumes it, seconds.
        self.max_pause = max_pause
        #: mmi.audit records per principal per minute (a token bucket per principal).
        self.audit_quota = audit_quota
        self._audit_buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)
        #: Audit bytes per principal per minute, and refusal records per principal per minute
        #: (their excess is a counter, issue 24).
        self.audit_bytes = RateQuota(P.AUDIT_BYTES_PER_MIN)
        self.refusal_records = RateQuota(P.FORBIDDEN_RECORDS_PER_MIN)
        #: Requests whose worker reported them paused: token -> when (Invariant: exactly the
        #: tracks with paused_at set).
        self._paused_at: dict[bytes, float] = {}
        #: worker identity -> slots it owes: a request paused by kernel preemption lent its slot
        #: out; when the kernel resumes it after max_pause, the next slot that frees repays it.
        self._slot_debt: dict[bytes, int] = {}
        #: A request its owner paused gives its slot back once it has been paused this long and
        #: others queue for its service (seconds; [limits] pause_slot_s).
        self.pause_slot = pause_slot
        #: Owner-paused requests whose slot may be given back at the time given (token -> (when,
        #: request)), then, once due with nobody queued, until someone queues (token -> request).
        #: Invariant: both hold only tracks paused by their owner (paused_at set, not paused).
        self._slot_due: dict[bytes, tuple[float, Request]] = {}
        self._slot_idle: dict[bytes, Request] = {}
        #: Jobs :meth:`on_done`'s charges exhausted (name, the request charged), for the router
        #: (:meth:`take_later`).  Kept under the base's type (``later``, a Sequence) and as the list
        #: it is (``_later``): a compiled subclass may not narrow an attribute's declared type.
        #: Invariant: both name the same list.
        self._later: list[tuple[str, Request]] = []
        self.later: Sequence[Any] = self._later
        self.tracks: dict[bytes, _Track] = {}
        self.counters = {"refused": 0, "exhausted": 0, "preempts": 0, "resumes": 0}
        #: Requests paused by kernel preemption whose slot is lent out (Invariant: equals the
        #: number of tracks with paused=True).
        self.paused_count = 0
        #: priority -> admitted requests not yet done (lets preemption skip its scan when no
        #: lower-priority work exists, the common case).
        self.prio_counts: dict[int, int] = {}
        #: (principal, idempotency key) of requests dispatched and not yet answered (snapshotted: a
        #: restarted kernel answers their retries KERNEL_RESTARTED instead of running them twice).
        self.idem_inflight: set[tuple[str, str]] = set()
        #: Keys that were in flight when the previous kernel died -> until when they are refused
        #: (principal None: from an older log without principals; it matches the key of anyone).
        self.interrupted: dict[tuple[str | None, str], float] = {}
        #: Exactly-once: the idempotency table the router consults (kernel.dedup); its stored
        #: FINALs are decisions (``final``) and part of every snapshot, so a restart keeps them.
        #: Under the base's type (``dedup``, which may be None) and as what it is here (``_dedup``),
        #: for the same reason as ``later``.  Invariant: both name the same table.
        self._dedup = Dedup()
        self.dedup: Dedup | None = self._dedup
        #: The configured [limits] of root and default (None: unlimited, no configure logged).
        self._limits = None if root_limits is None and default_limits is None \
            else {"root": dict(root_limits or {}), "default": dict(default_limits or {})}
        if decision_log is not None:
            decision_log.state = self.durable_state
        #: What :meth:`restore` restored at construction (``restored``: a kernel.replay report).
        self.restored: dict[str, Any] | None = None
        if restored is not None:
            self.restored = self.restore(restored, restored_at if restored_at is not None else 0.0)
        elif self._limits is not None:
            out = self.decide("configure", 0.0, **self._limits)
            if not out["ok"]:
                raise ValueError(f"[limits]: {out['message']}")

    def durable_state(self) -> dict[str, Any]:
        """What a decision-log snapshot holds: the ledger and the idempotency keys in flight."""
        return {"ledger": self.ledger.dump(), "inflight_idem": [list(k) for k in sorted(self.idem_inflight)],
                "dedup": self._dedup.dump()}

    def restore(self, report: Any, now: float) -> dict[str, Any]:
        """Continue the enforcement state a decision log held (kernel.replay.restore): its ledger
        (jobs with their owners, limits, spent amounts, held reservations with their holders and
        leases, the configured root/default limits) becomes this kernel's.
        Requests that were running when the previous kernel died are finished at the time of its
        last logged decision (their wall time stops there), and retries of those that carried an
        idempotency key are refused with KERNEL_RESTARTED for ``INTERRUPTED_TTL``.  The config's
        [limits] are applied (a logged ``configure``) when they differ from the restored ones and
        the ledger still allows it (no job carved from root); otherwise the log's stay in force."""
        ledger = report.ledger
        ledger.session = self.ledger.session
        self.ledger = ledger
        last = now if report.last_t is None else min(now, report.last_t)
        finished = 0
        for name, job in list(ledger.jobs.items()):
            for _ in range(job.running):
                self.decide("finish", last, job=name)
                finished += 1
        if self._limits is not None:
            root, default = ledger.jobs[ROOT], ledger.jobs[DEFAULT_JOB]
            if (root.limits, default.limits) != tuple({k: float(v) for k, v in self._limits[w].items()}
                                                      for w in ("root", "default")):
                out = self.decide("configure", now, **self._limits)
                if not out["ok"]:
                    log.warning("[limits] not applied over the restored state (%s); the decision log's "
                                "root %s and default %s stay in force", out["message"], root.limits,
                                default.limits)
        # in a fixed order (a set's depends on the hash seed), so a restart's records are reproducible
        keys = sorted((k for k in report.inflight_idem if k), key=lambda k: (k[0] is not None, k[0] or "", k[1]))
        self.interrupted = {k: now + P.INTERRUPTED_TTL for k in keys}
        self._dedup.load(list(getattr(report, "finals", {}).values()), now, report.last_t)
        for who, key in self.interrupted:
            self.record("interrupted", now, {"principal": who, "idem": key}, {"ok": True})
        self.flush_log()
        return {"jobs": len(ledger.jobs) - 2, "reservations": len(ledger._reservations),
                "finished": finished, "interrupted": len(self.interrupted), "finals": len(self._dedup.done)}

    def decide(self, op: str, now: float, **inputs: Any) -> dict[str, Any]:
        """Run the Ledger operation ``op`` and record it (inputs and outputs) in the log."""
        out: dict[str, Any] = getattr(self.ledger, op)(now, **inputs)
        if self.log is not None:
            self.log.append(op, now, inputs, out)
        return out

    def record(self, op: str, now: float, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Record a decision that is not the Ledger's (orders, process controls, audits)."""
        if self.log is not None:
            self.log.append(op, now, inputs, outputs)

    def flush_log(self) -> None:
        """Make the decision log current on disk (management calls and mmi.stats see it so)."""
        if self.log is not None:
            self.log.flush()

    # -- router hooks -----------------------------------------------------------------------------

    def unwritable(self) -> errors.Unavailable | None:
        """``unavailable`` while the decision log cannot be written (ENOSPC, EIO: issue 24): no
        work that needs a decision is admitted until a flush writes again, so nothing the kernel
        acknowledges is missing from the log (what was decided is buffered, in order)."""
        error = getattr(self.log, "error", None) if self.log is not None else None
        if error is None:
            return None
        self.counters["refused_log_unwritable"] = self.counters.get("refused_log_unwritable", 0) + 1
        return errors.Unavailable(f"the kernel's decision log cannot be written ({error}); work that needs "
                                  "a decision is refused until it can", reason="decision_log")

    def admit(self, view: View, req: Request, now: float) -> tuple[errors.RecaError | None, Effects]:
        if self.log is not None and getattr(self.log, "error", None) is not None:
            return self.unwritable(), NO_EFFECTS
        principal = req.principal
        operator = principal is LOCAL_OPERATOR or principal.operator
        job = req.job or DEFAULT_JOB
        if job == DEFAULT_JOB and not operator:  # (resolve_job's other cases: ``job`` as is)
            job, refused = self.resolve_job(principal, job, now)
            if refused is not None:
                self.counters["refused"] += 1
                return refused, NO_EFFECTS
        req.job = job
        checked = req.checked
        idem = checked.idem if checked is not None else None
        # keyed by the principal acted for (header ``for``), as the router's dedup is
        key = None if idem is None else (req.acting_for or req.principal.name, idem)
        if key is not None and self.interrupted:
            until = self.interrupted.get(key) or self.interrupted.get((None, key[1]))
            if until is not None and until > now:
                self.counters["interrupted_retries"] = self.counters.get("interrupted_retries", 0) + 1
                return errors.KernelRestarted(
                    "this request (same idempotency key) was in flight when the kernel restarted; "
                    "it may have run, so it is not run again", idem=idem), NO_EFFECTS
        budget = checked.budget if checked is not None else None
        jobrec = self.ledger.jobs.get(job)
        if budget:
            # a request budget names kinds of the budget kinds table, or counted resources its
            # job (or an ancestor) limits: a typo ("flopz") is an error, not an unlimited kind
            unknown = sorted(k for k in budget if k not in P.BUDGET_KINDS
                             and (jobrec is None or self.ledger.holder(jobrec, k) is None))
            if unknown:
                self.counters["refused"] += 1
                return errors.BadRequest(
                    f"unknown budget kind(s) {unknown}; kinds: {', '.join(P.BUDGET_KINDS)}, or a counted "
                    f"resource that job {job!r} limits", kind="budget_kind"), NO_EFFECTS
        if jobrec is not None and (checked is None or P.H_PRIORITY not in checked.raw):
            req.priority = jobrec.priority  # a request inherits its job's priority
        if not operator and not self.may_act(view, principal, job):
            self.counters["refused"] += 1
            self.on_forbidden(principal, "request", {"job": job}, now)
            return self.not_yours(job), NO_EFFECTS
        # Every request is a ledger decision (root and default are finite), and its start and
        # finish are counted, so a job with requests in flight is never closed under them.
        # (as decide("admit", ...), called directly on the hot path)
        inputs = {"job": job, "budget": budget, "start": True}
        out = self.ledger.admit(now, job, budget, True)
        if self.log is not None:
            self.log.append("admit", now, inputs, out)
        if not out["ok"]:
            self.counters["refused"] += 1
            return refusal(out), NO_EFFECTS
        granted = out["granted"]
        priority = req.priority
        self.tracks[req.token] = track = _Track(job, granted, priority, key)
        track.started = True  # admit started it
        if "mem_bytes" in granted:  # a memory ceiling for the escalation ladder (kernel/ladder.py Ceilings)
            wake = getattr(view, "ladder_wake", None)
            if wake is not None:
                wake()
        if P.CPU_MS in granted and jobrec is not None:
            holder = self.ledger.holder(jobrec, P.CPU_MS)
            track.measure_cpu = holder is not None and not is_default_job(holder.name)
        prio_counts = self.prio_counts
        prio_counts[priority] = prio_counts.get(priority, 0) + 1
        if budget and P.WALL_MS in budget:
            wall = granted.get(P.WALL_MS)
            if wall is not None:
                dl = now + wall / 1000.0
                req.deadline = dl if req.deadline is None else min(req.deadline, dl)
        service = req.service
        if service.ready or not service.workers:  # (_preempt_lower's common case, without the call)
            return None, NO_EFFECTS
        return None, self._preempt_lower(view, req, now)

    # -- authority ------------------------------------------------------------------------------

    def resolve_job(self, principal: Principal, job: str | None, now: float) -> tuple[str, errors.RecaError | None]:
        """The job a request or reservation of ``principal`` naming ``job`` (None: the default)
        lands in.  Operators share ``default``; every other principal has a default job of its
        own, ``default:<name>`` with the configured default limits (opened on first use, carved
        from root), so no one can exhaust another's default budget."""
        if job in (None, ""):
            job = DEFAULT_JOB  # an empty name is no name: the caller's default, never the shared one
        assert job is not None
        if job != DEFAULT_JOB or principal.operator:
            return job, None
        name = f"{DEFAULT_JOB}:{principal.name}"
        if self.ledger.owner_of(name) is None:
            out = self.decide("open", now, job=name, parent=None, limits=dict(self.default_limits),
                              owner=principal.name)
            if not out["ok"]:
                return name, refusal(out, "default job: ")
        return name, None

    def may_act(self, view: View, principal: Principal, job: str) -> bool:
        """Whether ``principal`` may act in open ``job``: an operator, its owner, or a service
        serving a request of that job right now (services act for their callers)."""
        if principal.operator:
            return True
        j = self.ledger.jobs.get(job)
        if j is None or j.closed:
            return False
        if j.owner is not None and j.owner == principal.name:
            return True
        return bool(principal.services) and view.serving(principal, job)

    @staticmethod
    def not_yours(job: Any) -> errors.Forbidden:
        """The answer for a job the caller may not act in, the same whether it exists or not."""
        return errors.Forbidden(f"no open job {job!r} of yours")

    def on_forbidden(self, principal: Principal, op: str, inputs: dict[str, Any], now: float) -> None:
        """Count, log and record a refused call (the decision log is the operator's record), at
        most ``FORBIDDEN_RECORDS_PER_MIN`` per principal: the rest are counted."""
        self.counters["forbidden"] = self.counters.get("forbidden", 0) + 1
        if self.record_limited(principal, "forbidden", now, {"principal": principal.name, "role": principal.role,
                                                              "op": op, **inputs},
                               {"ok": False, "code": ErrorCode.FORBIDDEN}):
            log.warning("forbidden: %s (%s) %s %s", principal.name, principal.role, op, inputs)

    def record_limited(self, principal: Principal, op: str, now: float, inputs: dict[str, Any], outputs: dict[str, Any]) -> bool:
        """Record a refusal unless ``principal`` is past its refusal-record quota (then count it;
        the next record it gets carries the count as ``suppressed``).  True when recorded."""
        ok, suppressed = self.refusal_records.take(principal.name, now)
        if not ok:
            self.counters["records_suppressed"] = self.counters.get("records_suppressed", 0) + 1
            return False
        self.record(op, now, inputs, {**outputs, "suppressed": suppressed} if suppressed else outputs)
        return True

    def audit_allowance(self, principal: Principal, events: int, now: float) -> bool:
        """Take ``events`` from the principal's audit bucket (refilled at ``audit_quota`` per
        minute, holding at most that many); False, taking nothing, when it has too few."""
        tokens, at = self._audit_buckets.get(principal.name, (float(self.audit_quota), now))
        tokens = min(float(self.audit_quota), tokens + (now - at) * self.audit_quota / 60.0)
        if events > tokens:
            self._audit_buckets[principal.name] = (tokens, now)
            return False
        self._audit_buckets[principal.name] = (tokens - events, now)
        return True

    def forward_header(self, req: Request, now: float) -> bytes:
        track = self.tracks.get(req.token)
        if track is None:
            return forwarded_header(req)
        if track.idem is not None and not track.ran:
            track.ran = True
            self.idem_inflight.add(track.idem)
            self.record("run", now, {"principal": track.idem[0], "idem": track.idem[1]}, {"ok": True})
        worker = req.worker
        if track.measure_cpu and worker is not None and worker.pid:
            track.cpu_start = self.host.cpu_seconds(worker.pid)
        if not track.granted:
            return forward_with(req, None)
        return forward_with(req, {P.H_GRANTED: track.granted, P.H_JOB: req.job})

    def _charge_status(self, view: View, req: Request, status: dict[str, Any], now: float,
                       effects: list[Effect], final: bool = False, track: _Track | None = None) -> errors.RecaError | None:
        """Charge what a status reports beyond what was charged already; ``final``: the request's
        FINAL, whose charges and end are one ``finish`` decision (``track``: the request's, when
        the caller has it)."""
        if track is None:
            track = self.tracks.get(req.token)
            if track is None:
                return None
        spent = status.get(P.S_SPENT)
        if not isinstance(spent, dict):
            spent = {}
        delta = {}
        # A worker names the kinds it spent; the ledger keeps and logs each, so beyond MAX_KINDS
        # only the granted ones (those that bound something) count, and no name is unbounded.
        many = len(spent) > P.MAX_KINDS
        for kind, value in spent.items():
            if not isinstance(kind, str) or kind == P.WALL_MS or not isinstance(value, (int, float)) \
                    or isinstance(value, bool) or not math.isfinite(value) or len(kind) > P.MAX_NAME \
                    or many and kind not in track.granted:
                continue
            cap = track.granted.get(kind)
            if cap is not None and value > cap:
                # A worker is charged at most what the kernel granted its request; the request
                # that reports more is answered budget_exceeded below.
                track.over = True
                value = cap
            d = value - track.charged.get(kind, 0.0)
            if d > 0:
                delta[kind] = d
                track.charged[kind] = value
        if final and track.started:
            track.started = False  # on_done has nothing left to finish
            # (as decide("finish", ...), called directly on the hot path)
            inputs: dict[str, Any] = {"job": track.job, "spent": delta} if delta else {"job": track.job}
            out = self.ledger.finish(now, track.job, delta or None)
            if self.log is not None:
                self.log.append("finish", now, inputs, out)
        elif delta:
            out = self.decide("charge", now, job=track.job, spent=delta)
        else:
            out = {}
        for name in out.get("exhausted", ()):
            effects.extend(self.exhaust(view, name, now, skip=req))
        if not delta:
            return errors.BudgetExceeded(f"request of job {track.job!r} charged beyond its grant: "
                                         f"{_amounts(track.charged, track.granted)}", spent=dict(track.charged)) \
                if track.over else None
        # The request that brought its job exactly to the limit keeps its result; one that went
        # past the job's limit or its own granted budget does not.
        job = self.ledger.jobs.get(track.job)
        # (no charged kind is above its grant: the loop above caps each; check_invariants says so)
        over = ["granted"] if track.over else []
        if job is not None:
            for kind in delta:
                if kind in COMPUTE:
                    h = self.ledger.holder(job, kind)
                    if h is not None and h.remaining(kind) < -1e-9:
                        over.append(kind)
        if over:
            kind = over[0]
            if kind in track.granted:
                why = f"request of job {track.job!r} ran out of its {kind} grant: {_amounts(track.charged, track.granted, kind)}"
            elif job is not None and (h := self.ledger.holder(job, kind)) is not None:
                why = f"job {h.name!r} ran out of {kind}: {_amounts(h.spent, h.limits, kind)}"
            else:
                why = f"request of job {track.job!r} ran out of its grant"
            return errors.BudgetExceeded(why, spent=dict(track.charged))
        return None

    def on_partial(self, view: View, req: Request, body: list[bytes], now: float) -> Effects:
        try:
            status = codec.unpack(body[0]) if body else None
        except errors.BadRequest:
            return NO_EFFECTS
        if not isinstance(status, dict):
            return NO_EFFECTS
        effects: list[Effect] = []
        exc = self._charge_status(view, req, status, now, effects)
        if exc is not None:
            effects.extend(self._cancel(req, ErrorCode.BUDGET_EXCEEDED, exc.message))
            effects.append(Fail(req, exc, self._spent(req, now)))
            return effects  # the router sees req.done and does not forward this PARTIAL
        state = status.get(P.S_STATUS)
        if state == P.STATUS_PAUSED:
            track = self.tracks.get(req.token)
            if track is not None and track.paused_at is None:
                track.paused_at = now
                self._paused_at[req.token] = now
                if not track.preempted and req.worker is not None:  # its owner paused it
                    self._slot_due[req.token] = (now + self.pause_slot, req)
                    if self.pause_slot <= 0:
                        effects.extend(self._slots_due(now))
            effects.extend(self._on_paused(req, now))
        elif state == P.STATUS_RESUMED:
            track = self.tracks.get(req.token)
            if track is not None:
                track.paused_at = None
                self._running_again(req, track)
            self._paused_at.pop(req.token, None)
        return effects

    def settle(self, view: View, req: Request, status: dict[str, Any], now: float) -> tuple[errors.RecaError | None, Effects]:
        track = self.tracks.get(req.token)
        if track is None:
            return None, NO_EFFECTS
        worker = req.worker
        if track.cpu_start is not None and worker is not None and worker.pid:
            # CPU time measured by the kernel (the host port; exact for capacity-1 workers, shared
            # among concurrent requests otherwise); it replaces any cpu_ms the worker reported.
            end = self.host.cpu_seconds(worker.pid)
            if end is not None:
                sp = status.get(P.S_SPENT)
                if not isinstance(sp, dict):
                    sp = status[P.S_SPENT] = {}
                sp[P.CPU_MS] = max(0.0, (end - track.cpu_start) * 1000.0)
        effects: list[Effect] = []
        return self._charge_status(view, req, status, now, effects, final=True, track=track), effects

    def on_queued(self, req: Request, now: float) -> Effects:
        track = self.tracks.get(req.token)
        if track is not None and track.started and not track.waiting:
            track.waiting = True
            job = track.job  # (as decide("queue", ...), called directly on the cap-1 hot path)
            out = self.ledger.queue(now, job)
            if self.log is not None:
                self.log.append("queue", now, {"job": job}, out)
        for token, paused in self._slot_idle.items():  # an owner-paused request past its bound
            if paused.service is req.service:
                del self._slot_idle[token]
                return self._give_back(paused)
        return NO_EFFECTS

    # -- a paused request gives its slot back ------------------------------------------------------

    def _slots_due(self, now: float) -> list[Effect]:
        """Owner-paused requests past ``pause_slot``: each gives its slot back when its service
        has requests queued, else waits (``_slot_idle``) until one queues."""
        effects: list[Effect] = []
        for token, (due, req) in list(self._slot_due.items()):
            if due > now:
                continue
            del self._slot_due[token]
            if req.service.queued > 0:
                effects.extend(self._give_back(req))
            else:
                self._slot_idle[token] = req
        return effects

    def _give_back(self, req: Request) -> Effects:
        track = self.tracks.get(req.token)
        if track is None or track.paused or req.done or req.worker is None:
            return NO_EFFECTS
        track.paused = track.given_back = True
        self.paused_count += 1
        self.counters["slots_given_back"] = self.counters.get("slots_given_back", 0) + 1
        return (Lend(req.worker),)

    def _running_again(self, req: Request, track: _Track) -> None:
        """``req`` runs again (its worker reported it resumed, or the kernel resumed it): it no
        longer waits to give its slot back; one whose slot was given back holds it again, so its
        worker owes a slot (the next that frees is not handed out)."""
        self._slot_due.pop(req.token, None)
        self._slot_idle.pop(req.token, None)
        if track.given_back:
            track.given_back = track.paused = track.preempted = False
            self.paused_count -= 1
            if req.worker is not None:
                self._slot_debt[req.worker.identity] = self._slot_debt.get(req.worker.identity, 0) + 1

    def on_dispatched(self, req: Request, now: float) -> bool:
        """Wall time counts from here, the job's (ledger ``dispatch``) and the request's own
        ``wall_ms``: its deadline becomes dispatch + budget (or the client's header deadline,
        which runs from arrival, if that is sooner)."""
        track = self.tracks.get(req.token)
        if track is None or not track.waiting:
            return False
        track.waiting = False
        job = track.job  # (as decide("dispatch", ...), called directly on the cap-1 hot path)
        out = self.ledger.dispatch(now, job)
        if self.log is not None:
            self.log.append("dispatch", now, {"job": job}, out)
        wall = track.granted.get(P.WALL_MS)
        checked = req.checked
        if wall is None or checked is None or P.WALL_MS not in (checked.budget or {}):
            return False
        deadline = now + wall / 1000.0
        if checked.deadline is not None:
            deadline = min(deadline, req.received + checked.deadline / 1000.0)
        moved: bool = deadline != req.deadline
        req.deadline = deadline
        return moved

    def on_deadline(self, view: View, req: Request, now: float) -> Effects:
        track = self.tracks.get(req.token)
        checked = req.checked
        if track is not None and track.waiting:
            # queued time never spends wall_ms: only the client's own deadline runs while queued
            if checked is None or checked.deadline is None or req.received + checked.deadline / 1000.0 > now:
                return NO_EFFECTS
            why = "request deadline passed"
            return (Fail(req, errors.DeadlineExceeded(why), self._spent(req, now)),)
        if req.deadline is not None and req.deadline > now:
            return NO_EFFECTS  # an entry of a deadline that moved at dispatch
        if track is not None and P.WALL_MS in track.granted and checked is not None \
                and (checked.budget or {}).get(P.WALL_MS) is not None:
            why = "request wall_ms budget ran out"
            return (*self._cancel(req, ErrorCode.BUDGET_EXCEEDED, why),
                    Fail(req, errors.BudgetExceeded(why), self._spent(req, now)))
        why = "request deadline passed"
        return (*self._cancel(req, ErrorCode.DEADLINE, why),
                Fail(req, errors.DeadlineExceeded(why), self._spent(req, now)))

    def on_done(self, req: Request, now: float, spent: dict[str, Any] | None,
                error: errors.RecaError | None) -> dict[str, Any] | None:
        track = self.tracks.pop(req.token, None)
        if track is None:
            return None
        # A request the kernel answered itself (budget, cancel, deadline, its worker lost) is
        # billed the CPU its worker burnt from dispatch to this answer, as a FINAL's settlement
        # bills it (the escalation ladder bills what it burns after: kernel/ladder.py, Billing).
        measured = self._cpu_to_answer(req, track) if error is not None and spent is None else None
        charge = None
        if measured is not None:
            d = measured - track.charged.get(P.CPU_MS, 0.0)
            if d > 0:
                charge = {P.CPU_MS: d}
                track.charged[P.CPU_MS] = measured
        if self._paused_at:
            self._paused_at.pop(req.token, None)
        if self._slot_due:
            self._slot_due.pop(req.token, None)
        if self._slot_idle:
            self._slot_idle.pop(req.token, None)
        if track.paused:
            self.paused_count -= 1
            if req.worker is not None:
                # Its slot was lent out and is still taken: the worker owes it (its late FINAL repays).
                self._slot_debt[req.worker.identity] = self._slot_debt.get(req.worker.identity, 0) + 1
        left = self.prio_counts.get(track.priority, 1) - 1
        if left:
            self.prio_counts[track.priority] = left
        else:
            self.prio_counts.pop(track.priority, None)
        if track.started:
            extra: dict[str, Any] = {"spent": charge} if charge else {}
            if track.waiting:  # answered while queued: its wall time had stopped
                out = self.decide("finish", now, job=track.job, queued=True, **extra)
            else:
                out = self.decide("finish", now, job=track.job, **extra)
            self._later.extend((name, req) for name in out.get("exhausted", ()))
        elif charge:
            out = self.decide("charge", now, job=track.job, spent=charge)
            self._later.extend((name, req) for name in out.get("exhausted", ()))
        if track.ran and track.idem is not None:
            self.idem_inflight.discard(track.idem)
            self.record("ran", now, {"principal": track.idem[0], "idem": track.idem[1]}, {"ok": True})
        return {P.CPU_MS: measured} if measured is not None else None

    def _cpu_to_answer(self, req: Request, track: _Track) -> float | None:
        """CPU ms the request's single-slot worker burnt from its dispatch to now, as the kernel
        measures it (only for requests whose CPU it measures: a job with a cpu_ms limit); None
        otherwise."""
        worker = req.worker
        if track.cpu_start is None or worker is None or not worker.pid or worker.capacity != 1:
            # A worker with several slots runs others' requests beside this one: its CPU is not
            # this request's alone (a spin beside it would bill its neighbour), so only the
            # worker's own report and the ladder's split after the answer bill it.
            return None
        end = self.host.cpu_seconds(worker.pid)
        if end is None:
            return None
        return max(0.0, (end - track.cpu_start) * 1000.0)

    def take_later(self, view: View, now: float) -> Effects:
        effects: list[Effect] = []
        later = self._later
        self.later = self._later = []
        for name, skip in later:
            job = self.ledger.jobs.get(name)
            if job is not None and job.exhausted is not None:  # (taken at once: still the same job)
                effects.extend(self.exhaust(view, name, now, skip=skip))
        return effects

    def tick(self, view: View, now: float) -> Effects:
        self.flush_log()
        effects: list[Effect] = []
        if self.ledger.next_deadline() <= now:
            out = self.decide("tick", now)
            for name in out["exhausted"]:
                effects.extend(self.exhaust(view, name, now))
        if self.ledger.next_expiry() <= now:  # logged only when a lease has run out
            self.decide("expire", now)
        if self._paused_at and min(self._paused_at.values()) + self.max_pause <= now:
            effects.extend(self._resume_overdue(view, now))
        if self._slot_due and min(due for due, _ in self._slot_due.values()) <= now:
            effects.extend(self._slots_due(now))
        if self.interrupted and min(self.interrupted.values()) <= now:
            self.interrupted = {k: t for k, t in self.interrupted.items() if t > now}
        return effects

    def next_wakeup(self) -> float:
        wake = min(self.ledger.next_deadline(), self.ledger.next_expiry())
        if self._paused_at:
            wake = min(wake, min(self._paused_at.values()) + self.max_pause)
        if self._slot_due:
            wake = min(wake, min(due for due, _ in self._slot_due.values()))
        return wake

    def _resume_overdue(self, view: View, now: float) -> list[Effect]:
        """Resume every request paused for ``max_pause`` or longer: no preemption, by the kernel or
        by anyone, starves a request.  One paused by kernel preemption had its slot lent out; its
        worker owes that slot back and the next one that frees repays it."""
        effects: list[Effect] = []
        for token, since in list(self._paused_at.items()):
            if since + self.max_pause > now:
                continue
            del self._paused_at[token]
            req = view.inflight.get(token)
            track = self.tracks.get(token)
            if req is None or track is None or req.done:
                continue
            track.paused_at = None
            self._slot_due.pop(token, None)
            self._slot_idle.pop(token, None)
            if track.paused:
                track.given_back = False
                track.paused = False
                track.preempted = False
                self.paused_count -= 1
                if req.worker is not None:
                    self._slot_debt[req.worker.identity] = self._slot_debt.get(req.worker.identity, 0) + 1
            self.counters["resumes"] += 1
            effects.append(Order.to_request(P.ControlOp.RESUME, req, **{P.C_REASON: "paused longer than max_pause"})
                           .with_why(why="max_pause", paused_s=round(now - since, 3)))
        return effects

    # -- exhaustion, cancel, preemption ---------------------------------------------------------

    def _spent(self, req: Request, now: float) -> dict[str, Any]:
        track = self.tracks.get(req.token)
        out = dict(track.charged) if track else {}
        # wall time from dispatch (queued time is not spent); none for a request never dispatched
        out[P.WALL_MS] = (now - req.dispatched) * 1000.0 if req.worker is not None else 0.0
        return out

    def _governed(self, job: str, exhausted: Job) -> bool:
        j = self.ledger.jobs.get(job)
        return j is not None and self.ledger.holder(j, exhausted.exhausted or "") is exhausted

    def exhaust(self, view: View, name: str, now: float, skip: Request | None = None) -> list[Effect]:
        """Cancel and answer every request drawing on the exhausted job's budget."""
        ex = self.ledger.jobs[name]
        self.counters["exhausted"] += 1
        log.warning("job %s exhausted its %s budget", name, ex.exhausted)
        kind = ex.exhausted or ""
        message = f"job {name!r} ran out of {kind}: {_amounts(ex.spent, ex.limits, kind)}"
        effects: list[Effect] = []
        # The job-wide cancel goes to the services holding its requests, never ctl/all.
        services = sorted({r.service.text for r in view.inflight.values() if r.job == name})
        for req in list(view.inflight.values()):
            if req.done or req is skip or req.job is None or not self._governed(req.job, ex):
                continue
            effects.extend(self._cancel(req, ErrorCode.BUDGET_EXCEEDED, message))
            effects.append(Fail(req, errors.BudgetExceeded(message, job=name), self._spent(req, now)))
        effects.extend(Order(service, P.ControlOp.CANCEL.value,
                             {P.C_JOB: name, P.C_CODE: ErrorCode.BUDGET_EXCEEDED, P.C_REASON: message})
                       for service in services)
        return effects

    @staticmethod
    def _cancel(req: Request, code: ErrorCode, reason: str) -> tuple[Effect, ...]:
        """The cancel order for ``req``'s worker (none for a request not yet dispatched: the
        router's answer is all there is)."""
        if req.worker is None:
            return ()
        return (Order.to_request(P.ControlOp.CANCEL, req, **{P.C_CODE: code, P.C_REASON: reason}),)

    def _preempt_lower(self, view: View, req: Request, now: float) -> Effects:
        """If ``req`` cannot be dispatched at once, ask the lowest-priority running request of its
        service with a lower priority to pause at its next safe point."""
        service = req.service
        if service.ready or not service.workers:
            return NO_EFFECTS
        if not any(p < req.priority for p in self.prio_counts):
            return NO_EFFECTS
        victim = None
        for w in service.workers.values():
            for r in w.inflight.values():
                t = self.tracks.get(r.token)
                if r.done or t is None or t.preempted or r.priority >= req.priority:
                    continue
                if victim is None or r.priority < victim.priority:
                    if self._may_preempt(view, req, r):
                        victim = r
        if victim is None:
            return NO_EFFECTS
        self.tracks[victim.token].preempted = True
        self.counters["preempts"] += 1
        return (Order.to_request(P.ControlOp.PREEMPT, victim, **{P.C_REASON: f"preempted by priority {req.priority}"})
                .with_why(victim=str(victim.rid), **{"for": str(req.rid)}),)

    def _may_preempt(self, view: View, req: Request, victim: Request) -> bool:
        """Kernel preemption follows mmi.preempt's rule: a request's priority pauses only requests
        its principal could pause by hand (its own, those of jobs it may act in; operators: any),
        so no client starves another principal's work by sending priority 1000."""
        p = req.principal
        return p.operator or victim.principal == p or (victim.job is not None and self.may_act(view, p, victim.job))

    def _on_paused(self, req: Request, now: float) -> Effects:
        track = self.tracks.get(req.token)
        if track is None or not track.preempted or track.paused or req.worker is None:
            return NO_EFFECTS
        track.paused = True
        self.paused_count += 1
        # Lend the paused request's slot to the queue (highest priority first).
        return (Lend(req.worker),)

    def claim_slot(self, view: View, worker: Worker, now: float) -> tuple[bool, Effects]:
        """A slot of ``worker`` freed: it returns to a paused request (which resumes) unless
        higher-priority work is queued for the service."""
        debt = self._slot_debt.get(worker.identity)
        if debt:
            # Repays a slot lent out by a request the kernel resumed after max_pause.
            if debt == 1:
                del self._slot_debt[worker.identity]
            else:
                self._slot_debt[worker.identity] = debt - 1
            return True, NO_EFFECTS
        if not self.paused_count:
            return False, NO_EFFECTS
        # (a request whose owner paused it and gave its slot back waits for its owner, not a slot)
        paused = [r for r in worker.inflight.values()
                  if not r.done and (t := self.tracks.get(r.token)) is not None and t.paused and not t.given_back]
        if not paused:
            return False, NO_EFFECTS
        victim = max(paused, key=lambda r: r.priority)
        # only its own principal's priority keeps it paused: another's (which could not preempt
        # it) must not hold its slot for max_pause (the freed slot then goes by DRR as usual)
        top = view.top_queued_priority(worker.service, victim.acting_for or victim.principal.name)
        if top is not None and top > victim.priority:
            return False, NO_EFFECTS  # the freed slot goes to the higher-priority queued request
        track = self.tracks[victim.token]
        track.paused = False
        track.preempted = False
        self.paused_count -= 1
        self.counters["resumes"] += 1
        return True, (Order.to_request(P.ControlOp.RESUME, victim),)

    def lent_slots(self, worker: Worker) -> int:
        """Slots of ``worker`` lent out: its paused requests' and those it still owes."""
        paused = sum(1 for r in worker.inflight.values()
                     if not r.done and (t := self.tracks.get(r.token)) is not None and t.paused)
        return paused + self._slot_debt.get(worker.identity, 0)

    def stats(self, now: float) -> dict[str, Any]:
        self.flush_log()
        self._dedup.sweep(now)
        # one page of jobs (issue 24: every job x kind cost a second with 10,000 x 64); mmi.stats
        # serves the others by ``jobs_page``
        out = {"jobs": self.ledger.snapshot(now, limit=P.STATS_PAGE), "ledger": dict(self.counters), "dedup": self._dedup.stats()}
        log_stats = getattr(self.log, "stats", None)
        if callable(log_stats):
            out["decision_log"] = log_stats()
        return out

    def worker_gone(self, identity: bytes) -> None:
        """A worker left: the slots it owed are gone with it."""
        self._slot_debt.pop(identity, None)

    def check_invariants(self, view: View) -> None:
        """Raise AssertionError naming the first broken invariant (module docstring), then the
        ledger's."""
        assert not self.later, "exhausted jobs left for the router to take"
        assert self.later is self._later and self.dedup is self._dedup, "later/dedup aliases differ"
        assert set(self._paused_at) == {t for t, tr in self.tracks.items() if tr.paused_at is not None}, \
            "_paused_at disagrees with the tracks"
        assert self.paused_count == sum(1 for tr in self.tracks.values() if tr.paused), "paused_count"
        prio: dict[int, int] = {}
        for tr in self.tracks.values():
            prio[tr.priority] = prio.get(tr.priority, 0) + 1
        assert prio == self.prio_counts, f"prio_counts {self.prio_counts} != {prio}"
        for token in self.tracks:
            req = view.inflight.get(token)
            assert req is not None and not req.done, f"a track of request {token.hex()} not in flight"
        assert all(v > 0 for v in self._slot_debt.values()), "a slot debt of zero is kept"
        for token, tr in self.tracks.items():
            assert all(v <= tr.granted[k] for k, v in tr.charged.items() if k in tr.granted), \
                f"request {token.hex()} charged above its grant"
        for token in (*self._slot_due, *self._slot_idle):
            owner_paused = self.tracks.get(token)
            assert owner_paused is not None and owner_paused.paused_at is not None and not owner_paused.paused, \
                "a slot to give back is not owner-paused"
        self.ledger.check_invariants()


def _amounts(spent: dict[str, float], limits: dict[str, float], kind: str | None = None) -> str:
    """``5000/5000`` (one kind) or ``flops 5000/5000, cpu_ms 3/10`` (every limited kind): what an
    error text says was spent of what was allowed."""
    kinds = [kind] if kind is not None else sorted(k for k in spent if k in limits)
    return ", ".join(("" if kind is not None else f"{k} ") + f"{spent.get(k, 0.0):g}/{limits.get(k, 0.0):g}"
                     for k in kinds)
