"""Budgets, gates and preemption: the part of the kernel no client can overrule.

:class:`Ledger` is pure and deterministic: every public operation takes ``now`` and plain inputs
and returns plain outputs (its decisions), so the decision log records ``(op, now, inputs,
outputs)`` and ``python -m kernel replay`` re-runs a fresh Ledger on the recorded inputs and
compares outputs.  It reads no clock, no file and no process: kernel.admission plugs it into the
Router, kernel.mmi answers the management calls that drive it, kernel.decisions writes its log.

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
import math
from typing import Any

from kernel import errors
from kernel import protocol as P
from kernel.protocol import ErrorCode

ROOT = "root"
DEFAULT_JOB = "default"
MEASURED = ("wall_ms", "cpu_ms")
#: Kinds whose exhaustion stops the job.  Any other kind is a counted resource: running out of
#: it only makes further reservations of it refused.
COMPUTE = ("wall_ms", "cpu_ms", "tokens", "flops")
RESERVATION_LEASE = P.RESERVATION_LEASE
INF = math.inf
#: Every operation whose inputs and outputs the decision log records and replay re-runs.
OPS = ("open", "close", "admit", "start", "finish", "charge", "tick", "reserve", "commit", "release",
       "renew", "expire")


def _lease_refusal(lease: Any) -> dict | None:
    """The ``bad_request`` decision for a lease out of bounds, None for a valid one."""
    if isinstance(lease, (int, float)) and not isinstance(lease, bool) and P.MIN_LEASE <= lease <= P.MAX_LEASE:
        return None
    return _no(ErrorCode.BAD_REQUEST, f"lease must be a number of seconds in [{P.MIN_LEASE:g}, {P.MAX_LEASE:g}]")


def _no(code: ErrorCode, message: str, **extra: Any) -> dict:
    """A refusing decision: ``{"ok": False, "code", "message", ...}``."""
    return {"ok": False, "code": code, "message": message, **extra}


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
            return _no(ErrorCode.BAD_REQUEST, f"job name {job!r} invalid or in use")
        limits = dict(limits or {})
        for kind, amount in limits.items():
            if not isinstance(kind, str) or not isinstance(amount, (int, float)) or isinstance(amount, bool) \
                    or not math.isfinite(amount) or amount < 0:
                return _no(ErrorCode.BAD_REQUEST, f"bad limit {kind!r}={amount!r}")
        pname = parent or ROOT
        p = self.jobs.get(pname)
        if p is None or p.closed:
            return _no(ErrorCode.REFUSED, f"unknown parent job {pname!r}")
        why = self.blocked_by(p)
        if why:
            return _no(ErrorCode.BUDGET_EXCEEDED, why)
        carve: dict[str, Job] = {}
        for kind, amount in limits.items():
            h = self.holder(p, kind)
            if h is None:
                continue
            rem = self.remaining(p, kind, now)
            if amount > rem + 1e-9:
                return _no(ErrorCode.BUDGET_EXCEEDED, f"{kind} {amount:g} exceeds the parent's remaining {rem:g}")
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
            return _no(ErrorCode.REFUSED, f"cannot close job {job!r}")
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
            return _no(ErrorCode(exc.code), exc.message)
        why = self.blocked_by(j)
        if why:
            return _no(ErrorCode.BUDGET_EXCEEDED, why)
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
                return _no(ErrorCode.BUDGET_EXCEEDED, f"no {kind} left in job {job!r}", granted=granted)
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
                lease: float = RESERVATION_LEASE, up_to: bool = False) -> dict:
        """Atomically take ``amount`` of a counted resource: granted (with a reservation id, or
        committed at once when ``commit``) or refused; never both.

        ``up_to``: take ``min(amount, what is left)`` instead (whole units when ``amount`` is an
        integer), refused only when nothing is left; the answer's ``granted`` says how much."""
        try:
            j = self.job(job)
        except errors.Refused as exc:
            return _no(ErrorCode(exc.code), exc.message)
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 < amount < P.MAX_AMOUNT:
            return _no(ErrorCode.BAD_REQUEST, "amount must be a positive number")
        refusal = _lease_refusal(lease)
        if refusal is not None:
            return refusal
        why = self.blocked_by(j)
        if why:
            return _no(ErrorCode.BUDGET_EXCEEDED, why)
        h = self.holder(j, resource)
        if up_to and h is not None and h.remaining(resource) < amount - 1e-9:
            left = max(0.0, h.remaining(resource))
            amount = math.floor(left + 1e-9) if isinstance(amount, int) else _r(left)
            if amount <= 0:
                return _no(ErrorCode.REFUSED, f"{resource}: nothing left", remaining=_r(left))
        if h is not None and h.remaining(resource) < amount - 1e-9:
            return _no(ErrorCode.REFUSED, f"{resource}: {amount:g} asked, {max(0.0, h.remaining(resource)):g} left",
                       remaining=_r(max(0.0, h.remaining(resource))))
        granted = {"granted": amount} if up_to else {}
        if commit:
            self.charge(now, job, {resource: amount})
            rem = self.remaining(j, resource, now)
            return {"ok": True, "committed": amount, "remaining": _r(rem), **granted}
        rid = f"{self.session}r{next(self._rid)}"
        self._reservations[rid] = (job, resource, float(amount), now + lease)
        if h is not None:
            h.reserved[resource] = h.reserved.get(resource, 0.0) + amount
        return {"ok": True, "reservation": rid, "remaining": _r(self.remaining(j, resource, now)), **granted}

    def commit(self, now: float, reservation: str) -> dict:
        entry = self._reservations.pop(reservation, None)
        if entry is None:
            return _no(ErrorCode.REFUSED, f"unknown or expired reservation {reservation!r}")
        job, resource, amount, _ = entry
        self._unreserve(job, resource, amount)
        out = self.charge(now, job, {resource: amount})
        return {"ok": True, "committed": amount, "exhausted": out["exhausted"]}

    def release(self, now: float, reservation: str) -> dict:
        entry = self._reservations.pop(reservation, None)
        if entry is None:
            return _no(ErrorCode.REFUSED, f"unknown or expired reservation {reservation!r}")
        job, resource, amount, _ = entry
        self._unreserve(job, resource, amount)
        return {"ok": True, "released": amount}

    def renew(self, now: float, reservations: list, lease: float = RESERVATION_LEASE) -> dict:
        """Extend held reservations to ``now + lease``.  Ids that are not held (expired, spent,
        released, or from before a kernel restart) are returned as ``unknown``: their holder must
        treat the units as lost."""
        if not isinstance(reservations, list) or not all(isinstance(r, str) for r in reservations):
            return _no(ErrorCode.BAD_REQUEST, "reservations must be a list of ids")
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

    def holds_reservations(self) -> bool:
        """Whether any reservation is held (the kernel expires leases only then)."""
        return bool(self._reservations)

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
