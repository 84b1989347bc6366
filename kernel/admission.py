"""Admission: the router hooks that enforce the Ledger.

:class:`BudgetAdmission` plugs the pure :class:`kernel.ledger.Ledger` into the
:class:`kernel.router.Router`: admission with clamping, charging from worker statuses and kernel
measurements, exhaustion with cancel, and priority preemption.  It touches the router only
through its public methods (``fail_request``, ``error_body``, ``free_slot``,
``top_queued_priority``, ``publish``, ``inflight``).  Every ledger operation goes through
:meth:`BudgetAdmission.decide`, which records it in the decision log (kernel.decisions).  The
management calls that drive the ledger (jobs, gates, orders) are kernel.mmi's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator

from kernel import codec, errors
from kernel import protocol as P
from kernel.decisions import DecisionLog, new_session_id
from kernel.ledger import COMPUTE, DEFAULT_JOB, Job, Ledger
from kernel.protocol import ErrorCode
from kernel.router import Admission, Request, Router, Worker
from kernel.supervisor import process_cpu_seconds

log = logging.getLogger("reca.ledger")


@dataclasses.dataclass(slots=True)
class _Track:
    """Per-request ledger state kept by BudgetAdmission."""

    job: str
    granted: dict
    charged: dict = dataclasses.field(default_factory=dict)
    started: bool = False
    preempted: bool = False
    paused: bool = False
    priority: int = 0
    cpu_start: float | None = None  # worker CPU seconds at dispatch (jobs with a cpu_ms limit)


class BudgetAdmission(Admission):
    """Router hooks that enforce the Ledger: admission with clamping, charging from worker
    statuses and kernel measurements, exhaustion with cancel, gates over MMI, preemption."""

    def __init__(self, ledger: Ledger | None = None, decision_log: DecisionLog | None = None) -> None:
        self.ledger = ledger or Ledger(session=decision_log.session if decision_log is not None
                                       else new_session_id())
        self.log = decision_log
        self.tracks: dict[bytes, _Track] = {}
        self.counters = {"refused": 0, "exhausted": 0, "preempts": 0, "resumes": 0}
        #: Requests paused by kernel preemption whose slot is lent out (Invariant: equals the
        #: number of tracks with paused=True).
        self.paused_count = 0
        #: priority -> admitted requests not yet done (lets preemption skip its scan when no
        #: lower-priority work exists, the common case).
        self.prio_counts: dict[int, int] = {}

    def decide(self, op: str, now: float, **inputs: Any) -> dict:
        """Run the Ledger operation ``op`` and record it (inputs and outputs) in the log."""
        out = getattr(self.ledger, op)(now, **inputs)
        if self.log is not None:
            self.log.append(op, now, inputs, out)
        return out

    def record(self, op: str, now: float, inputs: dict, outputs: dict) -> None:
        """Record a decision that is not the Ledger's (orders, process controls, audits)."""
        if self.log is not None:
            self.log.append(op, now, inputs, outputs)

    def flush_log(self) -> None:
        """Make the decision log current on disk (management calls and mmi.stats see it so)."""
        if self.log is not None:
            self.log.flush()

    # -- router hooks -----------------------------------------------------------------------------

    def admit(self, router: Router, req: Request, now: float) -> errors.RecaError | None:
        job = req.job or DEFAULT_JOB
        req.job = job
        budget = (req.header or {}).get(P.H_BUDGET)
        jobrec = self.ledger.jobs.get(job)
        if jobrec is not None and P.H_PRIORITY not in (req.header or {}):
            req.priority = jobrec.priority  # a request inherits its job's priority
        if jobrec is not None and not jobrec.closed and not budget and not jobrec.limits \
                and jobrec.exhausted is None and all(not j.limits for j in self._chain(jobrec)):
            # Fast path: a job with no limits anywhere up its chain needs no ledger decision.
            self.tracks[req.token] = _Track(job, {}, priority=req.priority)
            self.prio_counts[req.priority] = self.prio_counts.get(req.priority, 0) + 1
            self._preempt_lower(router, req, now)
            return None
        out = self.decide("admit", now, job=job, budget=budget)
        if not out["ok"]:
            self.counters["refused"] += 1
            return errors.from_wire({"code": out["code"], "message": out["message"]})
        granted = out["granted"]
        self.tracks[req.token] = track = _Track(job, granted, priority=req.priority)
        self.prio_counts[req.priority] = self.prio_counts.get(req.priority, 0) + 1
        wall = granted.get("wall_ms")
        if wall is not None and "wall_ms" in (budget or {}):
            dl = now + wall / 1000.0
            req.deadline = dl if req.deadline is None else min(req.deadline, dl)
        self.decide("start", now, job=job)
        track.started = True
        self._preempt_lower(router, req, now)
        return None

    @staticmethod
    def _chain(job: Job | None) -> Iterator[Job]:
        j = job
        while j is not None:
            yield j
            j = j.parent

    def forward_header(self, router: Router, req: Request) -> bytes:
        track = self.tracks.get(req.token)
        if track is not None and "cpu_ms" in track.granted and req.worker is not None and req.worker.pid:
            track.cpu_start = process_cpu_seconds(req.worker.pid)
        if track is None or not track.granted:
            return req.body[0]
        header = dict(req.header or {})
        header[P.H_GRANTED] = track.granted
        header[P.H_JOB] = req.job
        return codec.pack(header)

    def _charge_status(self, router: Router, req: Request, status: dict, now: float) -> errors.RecaError | None:
        track = self.tracks.get(req.token)
        spent = status.get(P.S_SPENT)
        if track is None or not isinstance(spent, dict):
            return None
        delta = {}
        for kind, value in spent.items():
            if not isinstance(kind, str) or kind == "wall_ms" or not isinstance(value, (int, float)) \
                    or isinstance(value, bool) or not math.isfinite(value):
                continue
            d = value - track.charged.get(kind, 0.0)
            if d > 0:
                delta[kind] = d
                track.charged[kind] = value
        if not delta:
            return None
        out = self.decide("charge", now, job=track.job, spent=delta)
        for name in out["exhausted"]:
            self.exhaust(router, name, now, skip=req)
        # The request that brought its job exactly to the limit keeps its result; one that went
        # past the job's limit or its own granted budget does not.
        job = self.ledger.jobs.get(track.job)
        over = [k for k, v in track.charged.items() if k in track.granted and v > track.granted[k] + 1e-9]
        if job is not None:
            for kind in delta:
                h = self.ledger.holder(job, kind)
                if h is not None and kind in COMPUTE and h.remaining(kind) < -1e-9:
                    over.append(kind)
        if over:
            return errors.BudgetExceeded(f"{over[0]} budget exceeded", spent=dict(track.charged))
        return None

    def on_partial(self, router: Router, req: Request, body: list[bytes], now: float) -> list[bytes]:
        try:
            status = codec.unpack(body[0]) if body else None
        except errors.BadRequest:
            return body
        if not isinstance(status, dict):
            return body
        exc = self._charge_status(router, req, status, now)
        if exc is not None:
            self._cancel_request(router, req, ErrorCode.BUDGET_EXCEEDED, exc.message)
            router.fail_request(req, exc, now, spent=self._spent(req, now))
            return body  # the router sees req.done and does not forward this PARTIAL
        if status.get(P.S_STATUS) == P.STATUS_PAUSED:
            self._on_paused(router, req, now)
        return body

    def on_final(self, router: Router, req: Request, body: list[bytes], now: float) -> list[bytes]:
        try:
            status = codec.unpack(body[0]) if body else None
        except errors.BadRequest:
            status = None
        if not isinstance(status, dict):
            exc = errors.ServiceError("worker sent a malformed status frame")
            self.on_done(router, req, now, None, exc)
            return router.error_body(req, exc)
        track = self.tracks.get(req.token)
        if track is not None and track.cpu_start is not None and req.worker is not None and req.worker.pid:
            # CPU time measured by the kernel from /proc (exact for capacity-1 workers, shared
            # among concurrent requests otherwise); it replaces any cpu_ms the worker reported.
            end = process_cpu_seconds(req.worker.pid)
            if end is not None:
                sp = status.get(P.S_SPENT)
                if not isinstance(sp, dict):
                    sp = status[P.S_SPENT] = {}
                sp["cpu_ms"] = max(0.0, (end - track.cpu_start) * 1000.0)
        exc = self._charge_status(router, req, status, now)
        spent = status.get(P.S_SPENT)
        if not isinstance(spent, dict):
            spent = {}
        spent["wall_ms"] = (now - req.received) * 1000.0
        status[P.S_SPENT] = spent
        self.on_done(router, req, now, spent, exc)
        if exc is not None:
            return router.error_body(req, exc, spent)
        return [codec.pack(status), *body[1:]]

    def on_deadline(self, router: Router, req: Request, now: float) -> None:
        track = self.tracks.get(req.token)
        if track is not None and "wall_ms" in track.granted and (req.header or {}).get(P.H_BUDGET, {}).get("wall_ms") is not None:
            self._cancel_request(router, req, ErrorCode.BUDGET_EXCEEDED, "request wall_ms budget ran out")
            router.fail_request(req, errors.BudgetExceeded("request wall_ms budget ran out"), now,
                                spent=self._spent(req, now))
        else:
            self._cancel_request(router, req, ErrorCode.DEADLINE, "request deadline passed")
            router.fail_request(req, errors.DeadlineExceeded("request deadline passed"), now, spent=self._spent(req, now))

    def on_done(self, router: Router, req: Request, now: float, spent: dict | None,
                error: errors.RecaError | None) -> None:
        track = self.tracks.pop(req.token, None)
        if track is None:
            return
        if track.paused:
            self.paused_count -= 1
        left = self.prio_counts.get(track.priority, 1) - 1
        if left:
            self.prio_counts[track.priority] = left
        else:
            self.prio_counts.pop(track.priority, None)
        if track.started:
            self.decide("finish", now, job=track.job)

    def tick(self, router: Router, now: float) -> None:
        self.flush_log()
        if self.ledger.next_deadline() <= now:
            out = self.decide("tick", now)
            for name in out["exhausted"]:
                self.exhaust(router, name, now)
        if self.ledger.holds_reservations():
            self.decide("expire", now)

    def next_wakeup(self) -> float:
        return self.ledger.next_deadline()

    # -- exhaustion, cancel, preemption ---------------------------------------------------------

    def _spent(self, req: Request, now: float) -> dict:
        track = self.tracks.get(req.token)
        out = dict(track.charged) if track else {}
        out["wall_ms"] = (now - req.received) * 1000.0
        return out

    def _governed(self, job: str, exhausted: Job) -> bool:
        j = self.ledger.jobs.get(job)
        return j is not None and self.ledger.holder(j, exhausted.exhausted or "") is exhausted

    def exhaust(self, router: Router, name: str, now: float, skip: Request | None = None) -> None:
        """Cancel and answer every request drawing on the exhausted job's budget."""
        ex = self.ledger.jobs[name]
        self.counters["exhausted"] += 1
        log.warning("job %s exhausted its %s budget", name, ex.exhausted)
        message = f"job {name!r} exhausted its {ex.exhausted} budget"
        for req in list(router.inflight.values()):
            if req.done or req is skip or req.job is None or not self._governed(req.job, ex):
                continue
            self._cancel_request(router, req, ErrorCode.BUDGET_EXCEEDED, message)
            router.fail_request(req, errors.BudgetExceeded(message, job=name), now, spent=self._spent(req, now))
        router.publish(P.control_topic(P.CTL_ALL, P.ControlOp.CANCEL),
                       {P.C_JOB: name, P.C_CODE: ErrorCode.BUDGET_EXCEEDED, P.C_REASON: message})

    def _cancel_request(self, router: Router, req: Request, code: ErrorCode, reason: str) -> None:
        if req.worker is not None:
            router.publish(P.control_topic(req.service.name.decode(errors="replace"), P.ControlOp.CANCEL),
                           {P.C_TOKEN: req.token, P.C_ID: req.rid, P.C_CODE: code, P.C_REASON: reason})

    def _preempt_lower(self, router: Router, req: Request, now: float) -> None:
        """If ``req`` cannot be dispatched at once, ask the lowest-priority running request of its
        service with a lower priority to pause at its next safe point."""
        service = req.service
        if service.ready or not service.workers:
            return
        if not any(p < req.priority for p in self.prio_counts):
            return
        victim = None
        for w in service.workers.values():
            for r in w.inflight.values():
                t = self.tracks.get(r.token)
                if r.done or t is None or t.preempted or r.priority >= req.priority:
                    continue
                if victim is None or r.priority < victim.priority:
                    victim = r
        if victim is None:
            return
        self.tracks[victim.token].preempted = True
        self.counters["preempts"] += 1
        self.record("preempt", now, {"victim": str(victim.rid), "for": str(req.rid)}, {"ok": True})
        router.publish(P.control_topic(service.name.decode(errors="replace"), P.ControlOp.PREEMPT),
                       {P.C_TOKEN: victim.token, P.C_ID: victim.rid, P.C_REASON: f"preempted by priority {req.priority}"})

    def _on_paused(self, router: Router, req: Request, now: float) -> None:
        track = self.tracks.get(req.token)
        if track is None or not track.preempted or track.paused or req.worker is None:
            return
        track.paused = True
        self.paused_count += 1
        # Lend the paused request's slot to the queue (highest priority first).
        router.free_slot(req.worker, now)

    def claim_slot(self, router: Router, worker: Worker, now: float) -> bool:
        """A slot of ``worker`` freed: it returns to a paused request (which resumes) unless
        higher-priority work is queued for the service."""
        if not self.paused_count:
            return False
        paused = [r for r in worker.inflight.values()
                  if not r.done and self.tracks.get(r.token) is not None and self.tracks[r.token].paused]
        if not paused:
            return False
        victim = max(paused, key=lambda r: r.priority)
        top = router.top_queued_priority(worker.service)
        if top is not None and top > victim.priority:
            return False  # the freed slot goes to the higher-priority queued request
        track = self.tracks[victim.token]
        track.paused = False
        track.preempted = False
        self.paused_count -= 1
        self.counters["resumes"] += 1
        service = worker.service
        self.record("resume", now, {"id": str(victim.rid)}, {"ok": True})
        router.publish(P.control_topic(service.name.decode(errors="replace"), P.ControlOp.RESUME),
                       {P.C_TOKEN: victim.token, P.C_ID: victim.rid})
        return True

    # -- MMI: jobs, gates, hard preemption ----------------------------------------------------------


    def stats(self, now: float) -> dict:
        self.flush_log()
        return {"jobs": self.ledger.snapshot(now), "ledger": dict(self.counters)}

