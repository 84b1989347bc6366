"""Budgets, gates and preemption: the part of the kernel no client can overrule.

:class:`Ledger` is pure and deterministic: every public operation takes ``now`` and plain inputs
and returns plain outputs (its decisions), so the decision log records ``(op, now, inputs,
outputs)`` and ``python -m kernel replay`` re-runs a fresh Ledger on the recorded inputs and
compares outputs.  :class:`BudgetAdmission` plugs the Ledger into the Router.

Budget model (docs/budgets.md):

* A job has limits per kind: ``wall_ms``, ``cpu_ms``, ``tokens``, ``flops`` and named counted
  resources.  A kind with no limit on a job is governed by the nearest ancestor that has one.
* Jobs nest.  Opening a child with a limit carves that amount out of the nearest ancestor
  holding that kind (it must fit in the ancestor's remainder); closing the child returns what it
  did not spend.  So children can never overspend a parent.
* ``remaining = limit - spent - carved - reserved``.  ``wall_ms`` is busy wall time: every
  request in flight spends it at rate 1, so a job with n requests in flight runs out at
  ``now + remaining / n``; the ledger keeps that exhaustion time exact as requests start and end.
* A request's asked-for budget is clamped to what its job has left; the granted budget travels
  to the worker in the header (``granted``) and bounds the request itself.
* When any kind of a job runs out, the job is exhausted: its work in flight is cancelled and
  answered ``budget_exceeded``, and it takes no new work.  Its descendants with budgets of their
  own are not affected; those drawing on the exhausted kind through it are.
* Gates: ``reserve`` takes units of a counted resource atomically (granted or refused, never
  over-granted: the kernel is single-threaded and the ledger holds the count), ``commit`` turns a
  reservation into spending, ``release`` gives it back.  Reservations not committed within their
  lease expire (presumed abort); a holder that needs longer renews its reservations (``renew``), so
  a live holder never loses units while a dead one's units come back within one lease.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import logging
import math
import os
import time
from typing import Any

from kernel import auth, codec, errors
from kernel import protocol as P
from kernel.router import Admission, Request, Router

log = logging.getLogger("reca.ledger")

ROOT = "root"
DEFAULT_JOB = "default"
MEASURED = ("wall_ms", "cpu_ms")
#: Kinds whose exhaustion stops the job.  Any other kind is a counted resource: running out of
#: it only makes further reservations of it refused.
COMPUTE = ("wall_ms", "cpu_ms", "tokens", "flops")
#: How long a gate reservation lives without commit, release or renewal, seconds (the default).
RESERVATION_LEASE = 30.0
#: Management calls that are ledger operations (their inputs are recorded and replayed).
_LEDGER_MMI = frozenset({"mmi.job.open", "mmi.job.close", "mmi.gate.reserve", "mmi.gate.commit",
                         "mmi.gate.release", "mmi.gate.renew"})
#: Bounds on one ``mmi.audit`` call: events per call, length of the source name.
MAX_AUDIT_EVENTS, MAX_AUDIT_SOURCE = 512, 64
#: Bounds on a lease a holder asks for, seconds.
MIN_LEASE, MAX_LEASE = 0.1, 3600.0
INF = math.inf


def _lease_refusal(lease: Any) -> dict | None:
    """The ``bad_request`` decision for a lease out of bounds, None for a valid one."""
    if isinstance(lease, (int, float)) and not isinstance(lease, bool) and MIN_LEASE <= lease <= MAX_LEASE:
        return None
    return {"ok": False, "code": "bad_request",
            "message": f"lease must be a number of seconds in [{MIN_LEASE:g}, {MAX_LEASE:g}]"}


def new_session_id() -> str:
    """A kernel run's id: the prefix of its reservation ids."""
    return f"{os.urandom(4).hex()}."


@dataclasses.dataclass
class Job:
    name: str
    parent: "Job | None"
    limits: dict[str, float]
    priority: int
    opened: float
    spent: dict[str, float] = dataclasses.field(default_factory=dict)  # against own limits
    total: dict[str, float] = dataclasses.field(default_factory=dict)  # everything charged here
    carved: dict[str, float] = dataclasses.field(default_factory=dict)  # given to open children
    reserved: dict[str, float] = dataclasses.field(default_factory=dict)  # open gate reservations
    carved_from: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> ancestor name
    children: set[str] = dataclasses.field(default_factory=set)
    exhausted: str | None = None  # the kind that ran out
    closed: bool = False
    # wall_ms accounting (only meaningful where "wall_ms" in limits)
    wall_running: int = 0
    wall_anchor: float = 0.0
    wall_deadline: float = INF

    def remaining(self, kind: str) -> float:
        return (self.limits[kind] - self.spent.get(kind, 0.0) - self.carved.get(kind, 0.0)
                - self.reserved.get(kind, 0.0))


def _r(x: float) -> float:
    """Round for the log and for comparisons in replay (ledger arithmetic is deterministic)."""
    return round(x, 6) if math.isfinite(x) else x


class Ledger:
    """The hierarchical budget ledger.  All public methods are deterministic in their inputs."""

    def __init__(self, root_limits: dict[str, float] | None = None, session: str = "") -> None:
        #: Prefix of this ledger's reservation ids (the decision log's session id), so an id held
        #: across a kernel restart is never mistaken for one of the new kernel's reservations.
        self.session = session
        self.jobs: dict[str, Job] = {}
        self._reservations: dict[str, tuple[str, str, float, float]] = {}  # id -> job, kind, amount, expiry
        self._rid = itertools.count(1)
        self._wall_heap: list[tuple[float, str]] = []
        self.jobs[ROOT] = Job(ROOT, None, dict(root_limits or {}), 0, 0.0)
        self.jobs[DEFAULT_JOB] = Job(DEFAULT_JOB, self.jobs[ROOT], {}, 0, 0.0)
        self.jobs[ROOT].children.add(DEFAULT_JOB)

    # -- lookups ----------------------------------------------------------------------------------

    def job(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None or job.closed:
            raise errors.Refused(f"unknown or closed job {name!r}; open it with mmi.job.open first", job=name)
        return job

    def holder(self, job: Job, kind: str) -> Job | None:
        """The nearest job, from ``job`` up, that has a limit on ``kind`` (None: unlimited)."""
        j: Job | None = job
        while j is not None:
            if kind in j.limits:
                return j
            j = j.parent
        return None

    def remaining(self, job: Job, kind: str, now: float) -> float:
        h = self.holder(job, kind)
        if h is None:
            return INF
        rem = h.remaining(kind)
        if kind == "wall_ms" and h.wall_running:
            rem -= h.wall_running * (now - h.wall_anchor) * 1000.0
        return rem

    def blocked_by(self, job: Job) -> str | None:
        """The reason ``job`` takes no new work: its own or a governing ancestor's exhaustion."""
        j: Job | None = job
        while j is not None:
            if j.exhausted is not None and (j is job or self.holder(job, j.exhausted) is j):
                return f"job {j.name!r} exhausted its {j.exhausted} budget"
            j = j.parent
        return None

    # -- operations (each is logged and replayable) ----------------------------------------------

    def open(self, now: float, job: str, parent: str | None = None, limits: dict | None = None,
             priority: int = 0) -> dict:
        if not isinstance(job, str) or not job or job in self.jobs and not self.jobs[job].closed:
            return {"ok": False, "code": "bad_request", "message": f"job name {job!r} invalid or in use"}
        limits = dict(limits or {})
        for kind, amount in limits.items():
            if not isinstance(kind, str) or not isinstance(amount, (int, float)) or isinstance(amount, bool) \
                    or not math.isfinite(amount) or amount < 0:
                return {"ok": False, "code": "bad_request", "message": f"bad limit {kind!r}={amount!r}"}
        pname = parent or ROOT
        p = self.jobs.get(pname)
        if p is None or p.closed:
            return {"ok": False, "code": "refused", "message": f"unknown parent job {pname!r}"}
        if self.blocked_by(p):
            return {"ok": False, "code": "budget_exceeded", "message": self.blocked_by(p)}
        carve: dict[str, Job] = {}
        for kind, amount in limits.items():
            h = self.holder(p, kind)
            if h is None:
                continue
            rem = self.remaining(p, kind, now)
            if amount > rem + 1e-9:
                return {"ok": False, "code": "budget_exceeded",
                        "message": f"{kind} {amount:g} exceeds the parent's remaining {rem:g}"}
            carve[kind] = h
        j = Job(job, p, {k: float(v) for k, v in limits.items()}, int(priority), now, wall_anchor=now)
        for kind, h in carve.items():
            if kind == "wall_ms":
                self._wall_settle(h, now)
            h.carved[kind] = h.carved.get(kind, 0.0) + j.limits[kind]
            j.carved_from[kind] = h.name
            if kind == "wall_ms":
                self._wall_rearm(h, now)
        self.jobs[job] = j
        p.children.add(job)
        return {"ok": True, "limits": {k: _r(v) for k, v in j.limits.items()}}

    def close(self, now: float, job: str) -> dict:
        j = self.jobs.get(job)
        if j is None or j.closed or job in (ROOT, DEFAULT_JOB):
            return {"ok": False, "code": "refused", "message": f"cannot close job {job!r}"}
        for child in list(j.children):
            self.close(now, child)
        if "wall_ms" in j.limits:
            self._wall_settle(j, now)
        for rid, (rjob, _, _, _) in list(self._reservations.items()):
            if rjob == job:
                self.release(now, rid)
        for kind, hname in j.carved_from.items():
            h = self.jobs[hname]
            if kind == "wall_ms":
                self._wall_settle(h, now)
            h.carved[kind] = h.carved.get(kind, 0.0) - j.limits[kind]
            h.spent[kind] = h.spent.get(kind, 0.0) + j.spent.get(kind, 0.0)
            if kind == "wall_ms":
                self._wall_rearm(h, now)
        j.closed = True
        if j.parent is not None:
            j.parent.children.discard(job)
        return {"ok": True, "spent": {k: _r(v) for k, v in j.total.items()}}

    def admit(self, now: float, job: str, budget: dict | None = None) -> dict:
        """Admit a request of ``job`` asking for ``budget``; returns the granted (clamped) budget."""
        try:
            j = self.job(job)
        except errors.Refused as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        why = self.blocked_by(j)
        if why:
            return {"ok": False, "code": "budget_exceeded", "message": why}
        granted: dict[str, float] = {}
        kinds = set(budget or {})
        h: Job | None = j
        while h is not None:
            kinds.update(h.limits)
            h = h.parent
        for kind in sorted(kinds):
            rem = self.remaining(j, kind, now)
            ask = (budget or {}).get(kind, INF)
            got = min(ask, rem)
            if math.isfinite(got):
                granted[kind] = _r(max(0.0, got))
        for kind, amount in granted.items():
            if amount <= 0 and (kind in (budget or {}) or kind in COMPUTE):
                return {"ok": False, "code": "budget_exceeded", "message": f"no {kind} left in job {job!r}",
                        "granted": granted}
        return {"ok": True, "granted": granted}

    def start(self, now: float, job: str) -> dict:
        """A request of ``job`` began running (wall time starts to count)."""
        h = self._wall_holder(job)
        if h is not None:
            self._wall_settle(h, now)
            h.wall_running += 1
            self._wall_rearm(h, now)
        return {"ok": True}

    def finish(self, now: float, job: str) -> dict:
        """A request of ``job`` ended (wall time stops counting)."""
        h = self._wall_holder(job)
        if h is not None and h.wall_running > 0:
            self._wall_settle(h, now)
            h.wall_running -= 1
            self._wall_rearm(h, now)
        return {"ok": True}

    def charge(self, now: float, job: str, spent: dict) -> dict:
        """Charge measured or reported spending; returns the jobs this exhausted."""
        j = self.jobs.get(job)
        if j is None:
            return {"ok": False, "exhausted": []}
        exhausted = []
        for kind in sorted(spent):
            amount = spent[kind]
            if kind == "wall_ms" or not isinstance(amount, (int, float)) or amount <= 0:
                continue  # wall time is accounted continuously by start/finish
            j.total[kind] = j.total.get(kind, 0.0) + amount
            h = self.holder(j, kind)
            if h is None:
                continue
            h.spent[kind] = h.spent.get(kind, 0.0) + amount
            if kind in COMPUTE and h.remaining(kind) <= 1e-9 and h.exhausted is None:
                h.exhausted = kind
                exhausted.append(h.name)
        return {"ok": True, "exhausted": exhausted}

    def tick(self, now: float) -> dict:
        """Exhaust every job whose wall budget has run out by ``now``."""
        exhausted = []
        heap = self._wall_heap
        while heap and heap[0][0] <= now:
            deadline, name = heapq.heappop(heap)
            j = self.jobs.get(name)
            if j is None or j.closed or j.wall_deadline != deadline or j.exhausted is not None:
                continue
            self._wall_settle(j, now)
            j.exhausted = "wall_ms"
            j.wall_deadline = INF
            exhausted.append(name)
        return {"ok": True, "exhausted": exhausted}

    def reserve(self, now: float, job: str, resource: str, amount: float = 1, commit: bool = False,
                lease: float = RESERVATION_LEASE) -> dict:
        """Atomically take ``amount`` of a counted resource: granted (with a reservation id, or
        committed at once when ``commit``) or refused; never both."""
        try:
            j = self.job(job)
        except errors.Refused as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 < amount < 1e15:
            return {"ok": False, "code": "bad_request", "message": "amount must be a positive number"}
        refusal = _lease_refusal(lease)
        if refusal is not None:
            return refusal
        why = self.blocked_by(j)
        if why:
            return {"ok": False, "code": "budget_exceeded", "message": why}
        h = self.holder(j, resource)
        if h is not None and h.remaining(resource) < amount - 1e-9:
            return {"ok": False, "code": "refused",
                    "message": f"{resource}: {amount:g} asked, {max(0.0, h.remaining(resource)):g} left",
                    "remaining": _r(max(0.0, h.remaining(resource)))}
        if commit:
            self.charge(now, job, {resource: amount})
            rem = self.remaining(j, resource, now)
            return {"ok": True, "committed": amount, "remaining": _r(rem)}
        rid = f"{self.session}r{next(self._rid)}"
        self._reservations[rid] = (job, resource, float(amount), now + lease)
        if h is not None:
            h.reserved[resource] = h.reserved.get(resource, 0.0) + amount
        return {"ok": True, "reservation": rid, "remaining": _r(self.remaining(j, resource, now))}

    def commit(self, now: float, reservation: str) -> dict:
        entry = self._reservations.pop(reservation, None)
        if entry is None:
            return {"ok": False, "code": "refused", "message": f"unknown or expired reservation {reservation!r}"}
        job, resource, amount, _ = entry
        self._unreserve(job, resource, amount)
        out = self.charge(now, job, {resource: amount})
        return {"ok": True, "committed": amount, "exhausted": out["exhausted"]}

    def release(self, now: float, reservation: str) -> dict:
        entry = self._reservations.pop(reservation, None)
        if entry is None:
            return {"ok": False, "code": "refused", "message": f"unknown or expired reservation {reservation!r}"}
        job, resource, amount, _ = entry
        self._unreserve(job, resource, amount)
        return {"ok": True, "released": amount}

    def renew(self, now: float, reservations: list, lease: float = RESERVATION_LEASE) -> dict:
        """Extend held reservations to ``now + lease``.  Ids that are not held (expired, spent,
        released, or from before a kernel restart) are returned as ``unknown``: their holder must
        treat the units as lost."""
        if not isinstance(reservations, list) or not all(isinstance(r, str) for r in reservations):
            return {"ok": False, "code": "bad_request", "message": "reservations must be a list of ids"}
        refusal = _lease_refusal(lease)
        if refusal is not None:
            return refusal
        renewed, unknown = [], []
        for rid in reservations:
            entry = self._reservations.get(rid)
            if entry is None or entry[3] <= now:
                unknown.append(rid)
                continue
            self._reservations[rid] = (*entry[:3], now + lease)
            renewed.append(rid)
        return {"ok": True, "renewed": renewed, "unknown": unknown}

    def expire(self, now: float) -> dict:
        """Release reservations whose lease ran out (presumed abort)."""
        gone = [rid for rid, (_, _, _, exp) in self._reservations.items() if exp <= now]
        for rid in gone:
            self.release(now, rid)
        return {"ok": True, "released": gone}

    # -- internals --------------------------------------------------------------------------------

    def _unreserve(self, job: str, resource: str, amount: float) -> None:
        j = self.jobs.get(job)
        h = self.holder(j, resource) if j is not None else None
        if h is not None:
            h.reserved[resource] = h.reserved.get(resource, 0.0) - amount

    def _wall_holder(self, job: str) -> Job | None:
        j = self.jobs.get(job)
        return None if j is None else self.holder(j, "wall_ms")

    def _wall_settle(self, h: Job, now: float) -> None:
        if h.wall_running:
            used = h.wall_running * (now - h.wall_anchor) * 1000.0
            h.spent["wall_ms"] = h.spent.get("wall_ms", 0.0) + used
            h.total["wall_ms"] = h.total.get("wall_ms", 0.0) + used
        h.wall_anchor = now

    def _wall_rearm(self, h: Job, now: float) -> None:
        if h.exhausted is not None or "wall_ms" not in h.limits:
            return
        if h.wall_running:
            h.wall_deadline = now + max(0.0, h.remaining("wall_ms")) / 1000.0 / h.wall_running
            heapq.heappush(self._wall_heap, (h.wall_deadline, h.name))
        else:
            h.wall_deadline = INF

    def next_deadline(self) -> float:
        heap = self._wall_heap
        while heap:
            deadline, name = heap[0]
            j = self.jobs.get(name)
            if j is not None and not j.closed and j.wall_deadline == deadline and j.exhausted is None:
                return deadline
            heapq.heappop(heap)
        return INF

    def snapshot(self, now: float) -> dict:
        """Every open job's limits, spend and remainder (for mmi.stats and the status CLI)."""
        out = {}
        for j in self.jobs.values():
            if j.closed:
                continue
            spent = dict(j.total)
            if "wall_ms" in j.limits and j.wall_running:
                spent["wall_ms"] = spent.get("wall_ms", 0.0) + j.wall_running * (now - j.wall_anchor) * 1000.0
            out[j.name] = {
                "parent": j.parent.name if j.parent else None,
                "limits": j.limits,
                "spent": {k: _r(v) for k, v in spent.items()},
                "remaining": {k: _r(max(0.0, self.remaining(j, k, now))) for k in j.limits},
                "exhausted": j.exhausted,
                "running": j.wall_running,
            }
        return out


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` from /proc (None if it is gone or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


class DecisionLog:
    """Append-only JSON-lines log of every ledger operation: ``{"seq", "t", "op", "in", "out"}``.

    ``t`` is the kernel's monotonic clock.  Lines are buffered and flushed on every kernel tick
    (at least every quarter heartbeat interval), so a kernel crash loses at most the decisions of
    that last fraction of a second; a torn last line is reported by replay as truncated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh = auth.open_append(path)  # never through a planted symlink
        self._seq = 0
        #: This kernel run's id: the prefix of its reservation ids (replay reads it back).
        self.session = new_session_id()
        self._fh.write(json.dumps({"seq": 0, "op": "session", "t": time.monotonic(), "pid": os.getpid(),
                                   "wall": time.time(), "session": self.session}) + "\n")

    def append(self, op: str, now: float, inputs: dict, outputs: dict) -> None:
        self._seq += 1
        self._fh.write(json.dumps({"seq": self._seq, "t": now, "op": op, "in": inputs, "out": outputs},
                                  default=str) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


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

    def __init__(self, ledger: Ledger | None = None, decision_log: DecisionLog | None = None,
                 supervisor: Any = None) -> None:
        self.ledger = ledger or Ledger(session=decision_log.session if decision_log is not None
                                       else new_session_id())
        self.log = decision_log
        self.supervisor = supervisor
        self.tracks: dict[bytes, _Track] = {}
        self.counters = {"refused": 0, "exhausted": 0, "preempts": 0, "resumes": 0}
        #: Requests paused by kernel preemption whose slot is lent out (Invariant: equals the
        #: number of tracks with paused=True).
        self.paused_count = 0
        #: priority -> admitted requests not yet done (lets preemption skip its scan when no
        #: lower-priority work exists, the common case).
        self.prio_counts: dict[int, int] = {}

    def _do(self, op: str, now: float, **inputs: Any) -> dict:
        out = getattr(self.ledger, op)(now, **inputs)
        if self.log is not None:
            self.log.append(op, now, inputs, out)
        return out

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
        out = self._do("admit", now, job=job, budget=budget)
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
        self._do("start", now, job=job)
        track.started = True
        self._preempt_lower(router, req, now)
        return None

    @staticmethod
    def _chain(job: Job):
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
        out = self._do("charge", now, job=track.job, spent=delta)
        for name in out["exhausted"]:
            self._exhaust(router, name, now, skip=req)
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
            self._cancel_request(router, req, "budget_exceeded", exc.message)
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
            return router._error_body(req, exc)
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
            return router._error_body(req, exc, spent)
        return [codec.pack(status), *body[1:]]

    def on_deadline(self, router: Router, req: Request, now: float) -> None:
        track = self.tracks.get(req.token)
        if track is not None and "wall_ms" in track.granted and (req.header or {}).get(P.H_BUDGET, {}).get("wall_ms") is not None:
            self._cancel_request(router, req, "budget_exceeded", "request wall_ms budget ran out")
            router.fail_request(req, errors.BudgetExceeded("request wall_ms budget ran out"), now,
                                spent=self._spent(req, now))
        else:
            self._cancel_request(router, req, "deadline", "request deadline passed")
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
            self._do("finish", now, job=track.job)

    def tick(self, router: Router, now: float) -> None:
        if self.log is not None:
            self.log.flush()
        if self.ledger.next_deadline() <= now:
            out = self._do("tick", now)
            for name in out["exhausted"]:
                self._exhaust(router, name, now)
        if self.ledger._reservations:
            self._do("expire", now)

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

    def _exhaust(self, router: Router, name: str, now: float, skip: Request | None = None) -> None:
        """Cancel and answer every request drawing on the exhausted job's budget."""
        ex = self.ledger.jobs[name]
        self.counters["exhausted"] += 1
        log.warning("job %s exhausted its %s budget", name, ex.exhausted)
        message = f"job {name!r} exhausted its {ex.exhausted} budget"
        for req in list(router.inflight.values()):
            if req.done or req is skip or req.job is None or not self._governed(req.job, ex):
                continue
            self._cancel_request(router, req, "budget_exceeded", message)
            router.fail_request(req, errors.BudgetExceeded(message, job=name), now, spent=self._spent(req, now))
        router.publish(P.control_topic(P.CTL_ALL, P.ControlOp.CANCEL),
                       {"job": name, "code": "budget_exceeded", "reason": message})

    def _cancel_request(self, router: Router, req: Request, code: str, reason: str) -> None:
        if req.worker is not None:
            router.publish(P.control_topic(req.service.name.decode(errors="replace"), P.ControlOp.CANCEL),
                           {"token": req.token, "id": req.rid, "code": code, "reason": reason})

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
        if self.log is not None:
            self.log.append("preempt", now, {"victim": str(victim.rid), "for": str(req.rid)}, {"ok": True})
        router.publish(P.control_topic(service.name.decode(errors="replace"), P.ControlOp.PREEMPT),
                       {"token": victim.token, "id": victim.rid, "reason": f"preempted by priority {req.priority}"})

    def _on_paused(self, router: Router, req: Request, now: float) -> None:
        track = self.tracks.get(req.token)
        if track is None or not track.preempted or track.paused or req.worker is None:
            return
        track.paused = True
        self.paused_count += 1
        # Lend the paused request's slot to the queue (highest priority first).
        router._free_slot(req.worker, now)

    def claim_slot(self, router: Router, worker: Any, now: float) -> bool:
        """A slot of ``worker`` freed: it returns to a paused request (which resumes) unless
        higher-priority work is queued for the service."""
        if not self.paused_count:
            return False
        paused = [r for r in worker.inflight.values()
                  if not r.done and self.tracks.get(r.token) is not None and self.tracks[r.token].paused]
        if not paused:
            return False
        victim = max(paused, key=lambda r: r.priority)
        queue = worker.service.queue
        while queue and queue[0][2].done:
            heapq.heappop(queue)
        if queue and -queue[0][0] > victim.priority:
            return False  # the freed slot goes to the higher-priority queued request
        track = self.tracks[victim.token]
        track.paused = False
        track.preempted = False
        self.paused_count -= 1
        self.counters["resumes"] += 1
        service = worker.service
        if self.log is not None:
            self.log.append("resume", now, {"id": str(victim.rid)}, {"ok": True})
        router.publish(P.control_topic(service.name.decode(errors="replace"), P.ControlOp.RESUME), {"token": victim.token, "id": victim.rid})
        return True

    # -- MMI: jobs, gates, hard preemption ----------------------------------------------------------

    def mmi(self, router: Router, name: str, arg: Any, header: dict | None, now: float,
            caller: bytes = b"") -> Any:
        if self.log is not None:
            self.log.flush()  # management calls see a log that is current
        if not isinstance(arg, dict):
            arg = {}
        if name in _LEDGER_MMI:
            # The ledger sees its inputs exactly as the decision log records them (JSON), so
            # replay reproduces its decisions whatever msgpack types the caller sent.
            try:
                arg = json.loads(json.dumps(arg))
            except (TypeError, ValueError, RecursionError) as exc:
                return errors.BadRequest(f"{name}: the argument must be plain data: {exc}")
        try:
            if name == "mmi.job.open":
                out = self._do("open", now, job=arg.get("job"), parent=arg.get("parent"),
                               limits=arg.get("budget") or arg.get("limits"), priority=arg.get("priority", 0))
            elif name == "mmi.job.close":
                out = self._do("close", now, job=arg.get("job"))
            elif name == "mmi.job.stats":
                snap = self.ledger.snapshot(now)
                job = arg.get("job")
                return snap.get(job, errors.Refused(f"unknown job {job!r}")) if job else snap
            elif name == "mmi.gate.reserve":
                lease = {"lease": arg["lease_s"]} if "lease_s" in arg else {}
                out = self._do("reserve", now, job=arg.get("job", DEFAULT_JOB), resource=arg.get("resource"),
                               amount=arg.get("amount", 1), commit=bool(arg.get("commit", False)), **lease)
                for jname in out.get("exhausted", []):
                    self._exhaust(router, jname, now)
            elif name == "mmi.gate.commit":
                out = self._do("commit", now, reservation=arg.get("reservation"))
                for jname in out.get("exhausted", []):
                    self._exhaust(router, jname, now)
            elif name == "mmi.gate.release":
                out = self._do("release", now, reservation=arg.get("reservation"))
            elif name == "mmi.gate.renew":
                out = self._do("renew", now, reservations=arg.get("reservations"),
                               lease=arg.get("lease_s", RESERVATION_LEASE))
            elif name == "mmi.audit":
                return self._audit(arg, now)
            elif name in ("mmi.preempt", "mmi.resume", "mmi.cancel"):
                return self._order(router, name, arg, now, caller)
            elif name == "mmi.control":
                # Orders that are not the kernel's own decisions (fidelity, precision) are relayed
                # on the control bus; preempt/resume/cancel stay with the dedicated calls above.
                op, service, message = arg.get("op"), arg.get("service", P.CTL_ALL), arg.get("message")
                if op not in (P.ControlOp.FIDELITY.value, P.ControlOp.PRECISION.value) \
                        or not isinstance(service, str) or not isinstance(message, dict):
                    return errors.BadRequest("mmi.control needs op 'fidelity' or 'precision', a service "
                                             "and a message map")
                if self.log is not None:
                    self.log.append(op, now, {"service": service}, {"ok": True})
                router.publish(P.control_topic(service, op), message)
                return {"ok": True}
            elif name in ("mmi.proc.stop", "mmi.proc.cont", "mmi.proc.nice", "mmi.proc.affinity"):
                return self._proc(name, arg, now)
            else:
                return None
        except (TypeError, ValueError, OverflowError) as exc:
            return errors.BadRequest(f"{name}: {exc}")
        if not out.get("ok") and "code" in out:
            return errors.from_wire({"code": out["code"], "message": out.get("message", "")})
        return out

    def _order(self, router: Router, name: str, arg: dict, now: float, caller: bytes) -> Any:
        """``mmi.preempt/resume/cancel`` with one target: ``token`` (a request's kernel token,
        bytes or hex: exact), ``job`` (every request of the job) or ``id`` (a request id of the *caller's own*
        requests in flight: ids are chosen by clients, so they only name a request together with
        the client that sent it).  Published on the control bus; the workers act at safe points."""
        op = name.split(".", 1)[1]
        service = arg.get("service", P.CTL_ALL)
        if isinstance(arg.get("token"), str):  # hex, as JSON (the CLI) can carry it
            try:
                arg = {**arg, "token": bytes.fromhex(arg["token"])}
            except ValueError:
                return errors.BadRequest(f"{name}: 'token' is not hex: {arg['token']!r}")
        keys = [k for k in ("token", "job", "id") if k in arg]
        if len(keys) != 1 or not isinstance(service, str) \
                or "token" in arg and not isinstance(arg["token"], bytes) \
                or "job" in arg and not isinstance(arg["job"], str):
            return errors.BadRequest(f"{name} needs one of 'token' (bytes), 'job' or 'id' (and optionally "
                                     "'service')")
        if "job" in arg:
            messages = [(service, {"job": arg["job"]})]
        else:
            if "token" in arg:  # the in-flight table is keyed by token
                found = router.inflight.get(arg["token"])
                candidates = [found] if found is not None else []
            else:
                candidates = [r for r in router.inflight.values() if r.client == caller and r.rid == arg["id"]]
            reqs = [r for r in candidates
                    if not r.done and (service == P.CTL_ALL or r.service.name == service.encode())]
            if not reqs:
                what = "that token" if "token" in arg else f"id {arg['id']!r} from this client"
                return errors.Refused(f"{name}: no request with {what} in flight")
            messages = [(r.service.name.decode(errors="replace"), {"token": r.token, "id": r.rid}) for r in reqs]
        for topic_service, message in messages:
            if self.log is not None:
                self.log.append(op, now, {k: (v.hex() if isinstance(v, bytes) else v) for k, v in message.items()},
                                {"ok": True})
            router.publish(P.control_topic(topic_service, op), message)
        return {"ok": True, "targets": len(messages)}

    def _audit(self, arg: dict, now: float) -> Any:
        """``mmi.audit {source, events}``: a service appends its own decisions (maps) to the
        kernel's decision log, so one log holds every decision of the runtime.  Replay lists them
        (they are the service's decisions, not the ledger's)."""
        source, events = arg.get("source"), arg.get("events")
        if not isinstance(source, str) or not 0 < len(source) <= MAX_AUDIT_SOURCE \
                or not isinstance(events, list) or not 0 < len(events) <= MAX_AUDIT_EVENTS \
                or not all(isinstance(e, dict) for e in events):
            return errors.BadRequest(f"mmi.audit needs a 'source' name (1..{MAX_AUDIT_SOURCE} chars) and "
                                     f"'events', a list of 1..{MAX_AUDIT_EVENTS} maps")
        if self.log is None:
            return {"ok": True, "logged": 0}
        try:  # all or nothing: a batch that cannot be written is refused before any line is
            json.dumps(events, default=str)
        except (TypeError, ValueError, RecursionError) as exc:
            return errors.BadRequest(f"mmi.audit: events must be plain data: {exc}")
        for event in events:
            self.log.append("audit", now, {"source": source, "event": event}, {"ok": True})
        self.log.flush()  # the caller advances its high-water mark on this answer
        return {"ok": True, "logged": len(events)}

    def _proc(self, name: str, arg: dict, now: float) -> Any:
        sup = self.supervisor
        child = arg.get("child")
        if sup is None or not isinstance(child, str):
            return errors.BadRequest(f"{name} needs 'child' (a supervised child name)")
        try:
            if name == "mmi.proc.stop":
                pid = sup.suspend(child)
            elif name == "mmi.proc.cont":
                pid = sup.resume(child)
            elif name == "mmi.proc.nice":
                sup.set_nice(child, int(arg["nice"]))
                pid = sup.child(child).pid
            else:
                sup.set_affinity(child, [int(c) for c in arg["cpus"]])
                pid = sup.child(child).pid
        except LookupError as exc:
            return errors.Refused(str(exc))
        except (KeyError, OSError) as exc:
            return errors.BadRequest(f"{name}: {exc}")
        if self.log is not None:
            self.log.append(name.split(".", 1)[1], now, dict(arg), {"ok": True, "pid": pid})
        return {"ok": True, "pid": pid}

    def on_forbidden(self, router: Router, principal: Any, op: str, inputs: dict, now: float) -> None:
        self.counters["forbidden"] = self.counters.get("forbidden", 0) + 1
        log.warning("forbidden: %s (%s) %s %s", principal.name, principal.role, op, inputs)
        if self.log is not None:
            self.log.append("forbidden", now, {"principal": principal.name, "role": principal.role, "op": op,
                                               **inputs}, {"ok": False, "code": "forbidden"})

    def stats(self) -> dict:
        import time as _t

        if self.log is not None:
            self.log.flush()

        return {"jobs": self.ledger.snapshot(_t.monotonic()), "ledger": dict(self.counters)}
