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

import collections
import dataclasses
import heapq
import json
import math
from typing import Any, Final, Iterable

from kernel import errors
from kernel import protocol as P
from kernel.protocol import ErrorCode

ROOT: Final = "root"
DEFAULT_JOB: Final = "default"
#: The kind accrued continuously by every request in flight (busy wall time).
WALL: Final = P.WALL_MS
#: Kinds whose exhaustion stops the job (the compute rows of kernel.protocol.BUDGET_KINDS).  Any
#: other kind is a counted resource: running out of it only makes further reservations of it
#: refused.
COMPUTE: Final = P.COMPUTE_KINDS
RESERVATION_LEASE: Final = P.RESERVATION_LEASE
INF: Final = math.inf
#: Every operation whose inputs and outputs the decision log records and replay re-runs.
OPS: Final = ("configure", "open", "close", "admit", "start", "finish", "charge", "tick", "reserve", "commit",
       "release", "renew", "expire", "queue", "dispatch")


def _lease_refusal(lease: Any) -> dict[str, Any] | None:
    """The ``bad_request`` decision for a lease out of bounds, None for a valid one."""
    if isinstance(lease, (int, float)) and not isinstance(lease, bool) and P.MIN_LEASE <= lease <= P.MAX_LEASE:
        return None
    return _no(ErrorCode.BAD_REQUEST, f"lease must be a number of seconds in [{P.MIN_LEASE:g}, {P.MAX_LEASE:g}]")


def _no(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    """A refusing decision: ``{"ok": False, "code", "message", ...}``.  Every refusal of the
    ledger is one of these (it never raises); :func:`refusal` turns one into its typed error."""
    return {"ok": False, "code": code, "message": message, **extra}


def _unknown_job(job: Any) -> dict[str, Any]:
    return _no(ErrorCode.REFUSED, f"unknown or closed job {job!r}; open it with mmi.job.open first")


def refusal(decision: dict[str, Any], prefix: str = "") -> errors.RecaError | None:
    """The typed error a decision refused with (None: it did not refuse).  ``prefix``: put
    before its message (which decision it was, for the caller)."""
    if decision.get("ok") or "code" not in decision:
        return None
    return errors.from_wire({"code": decision["code"], "message": prefix + str(decision.get("message", ""))})


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
    #: The principal that opened it (children: the parent's owner); None for root and default.
    owner: str | None = None
    #: Requests of this job in flight (started, not finished).  A job with any in its subtree
    #: cannot be closed, so no request's charges can land on a re-opened job of the same name.
    running: int = 0
    #: Cache: (kind, holder) for every kind limited on the chain up from here, sorted by kind.
    #: Limits never change after open (configure runs before any job), so it is computed once.
    holders: "list[tuple[str, Job]] | None" = None
    #: Cache: kind -> its holder (the nearest job from here up limiting it), built with ``holders``.
    by_kind: "dict[str, Job] | None" = None
    # wall_ms accounting (only meaningful where WALL in limits)
    wall_running: int = 0
    wall_anchor: float = 0.0
    wall_deadline: float = INF
    #: The deadline of this job's live entry in the ledger's wall heap (INF: none): a lower bound of
    #: ``wall_deadline``, so a re-arm that does not move the deadline earlier pushes nothing.
    wall_bound: float = INF

    def remaining(self, kind: str) -> float:
        return (self.limits[kind] - self.spent.get(kind, 0.0) - self.carved.get(kind, 0.0)
                - self.reserved.get(kind, 0.0))


#: Job fields a snapshot does not hold: links (written as names) and caches rebuilt on use.
_NOT_DUMPED: Final = ("parent", "children", "holders", "by_kind", "wall_bound")


def is_default_job(name: str) -> bool:
    """``root``, ``default`` and the per-principal ``default:<name>`` jobs."""
    return name in (ROOT, DEFAULT_JOB) or name.startswith(DEFAULT_JOB + ":")


def _finite_amount(amount: Any) -> bool:
    return isinstance(amount, (int, float)) and not isinstance(amount, bool) and math.isfinite(amount) \
        and 0 <= amount < P.MAX_LIMIT


def _r(x: Any) -> Any:  # Any, not float: compiled code would turn an int into a float
    """Round for the log and for comparisons in replay (ledger arithmetic is deterministic).

    An integral value is returned as it is, bit for bit what ``round(x, 6)`` gives (an int stays
    the int, a float the float, -0.0 itself) without its cost; nan and inf (``% 1.0`` is nan) take
    the general path.  ``% 1.0``, not ``is_integer()``: the sums may be ints.  A bool is not returned
    as it is: ``round(True, 6)`` is the int 1."""
    if x % 1.0 == 0.0 and type(x) is not bool:
        return x
    return round(x, 6) if math.isfinite(x) else x


def _kind_entries(j: Job) -> int:
    """The kinds job ``j`` holds: its limits and every kind charged to it."""
    return len(j.limits.keys() | j.total.keys())


class Ledger:
    """The hierarchical budget ledger.  All public methods are deterministic in their inputs."""

    def __init__(self, root_limits: dict[str, float] | None = None, session: str = "") -> None:
        #: Prefix of this ledger's reservation ids (the decision log's session id), so an id held
        #: across a kernel restart is never mistaken for one of the new kernel's reservations.
        self.session = session
        self.jobs: dict[str, Job] = {}
        #: id -> (job, kind, amount, expiry, holder): holder is the principal that reserved.
        self._reservations: dict[str, tuple[str, str, float, float, str | None]] = {}
        #: holder -> reservations it holds (Invariant: the count of ``_reservations`` by holder).
        self.held_by: collections.Counter[str] = collections.Counter()
        self._rid_next = 1  # the counter of ids when no id is given (dumped in snapshots)
        #: owner -> its open jobs (children included), so a caller's share of jobs is bounded.
        self._owned: collections.Counter[str] = collections.Counter()
        #: owner -> the kinds its open jobs hold (limits and charged kinds, one per job and kind),
        #: bounded by ``max_kinds`` (issue 24: 10,000 jobs x 64 kinds).
        self._kinds: collections.Counter[str] = collections.Counter()
        #: The bound on an owner's kinds (``P.MAX_KINDS_PER_PRINCIPAL``), an attribute so that a test
        #: can lower it: compiled code inlines a Final constant, so patching ``P`` would not reach it.
        self.max_kinds: int = P.MAX_KINDS_PER_PRINCIPAL
        #: charged kinds not kept in a job's ``total`` because its owner was at the bound
        self.kinds_dropped = 0
        #: owner -> its open jobs' names (in opening order), so one principal's listing costs its
        #: own jobs, not the ledger's (mmi.stats below operator, issue 24)
        self._by_owner: dict[str, dict[str, None]] = {}
        self._wall_heap: list[tuple[float, str]] = []
        #: (expiry, id) of held reservations, lazily cleaned (an entry whose id is gone or whose
        #: expiry changed is skipped).
        self._expiry_heap: list[tuple[float, str]] = []
        self.jobs[ROOT] = Job(ROOT, None, dict(root_limits or {}), 0, 0.0)
        self.jobs[DEFAULT_JOB] = Job(DEFAULT_JOB, self.jobs[ROOT], {}, 0, 0.0)
        self.jobs[ROOT].children.add(DEFAULT_JOB)

    # -- lookups ----------------------------------------------------------------------------------

    def open_job(self, name: str) -> Job | None:
        """Open job ``name`` (None: unknown or closed)."""
        job = self.jobs.get(name)
        return None if job is None or job.closed else job

    @staticmethod
    def _holders(job: Job) -> "list[tuple[str, Job]]":
        if job.holders is None:
            found: dict[str, Job] = {}
            h: Job | None = job
            while h is not None:
                for kind in h.limits:
                    found.setdefault(kind, h)
                h = h.parent
            job.holders = sorted(found.items())
            job.by_kind = found
        return job.holders

    def holder(self, job: Job, kind: str) -> Job | None:
        """The nearest job, from ``job`` up, that has a limit on ``kind`` (None: unlimited).
        From the job's cache (limits change only at configure, which clears every cache)."""
        by_kind = job.by_kind
        if by_kind is None:
            self._holders(job)
            by_kind = job.by_kind
            assert by_kind is not None
        return by_kind.get(kind)

    def remaining(self, job: Job, kind: str, now: float) -> float:
        h = self.holder(job, kind)
        if h is None:
            return INF
        rem = h.remaining(kind)
        if kind == WALL and h.wall_running:
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

    def owner_of(self, name: str) -> str | None:
        """The owner of open job ``name`` (None: no such open job, or root/default)."""
        j = self.jobs.get(name)
        return None if j is None or j.closed else j.owner

    def jobs_of(self, owner: str) -> int:
        """How many open jobs ``owner`` owns (children included)."""
        return self._owned.get(owner, 0)

    def kinds_of(self, owner: str) -> int:
        """How many (job, kind) entries ``owner``'s open jobs hold (limits and charged kinds)."""
        return self._kinds.get(owner, 0)

    def in_flight(self, job: Job) -> int:
        """Requests in flight in ``job`` and its open descendants."""
        return job.running + sum(self.in_flight(self.jobs[c]) for c in job.children)

    def reservation_of(self, reservation: str) -> tuple[str, str | None] | None:
        """``(job, holder)`` of a held reservation, None if it is not held."""
        entry = self._reservations.get(reservation)
        return None if entry is None else (entry[0], entry[4])

    # -- operations (each is logged and replayable) ----------------------------------------------

    def configure(self, now: float, root: dict[str, Any] | None = None, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """Set the finite limits of ``root`` and ``default`` (the config's [limits]); the default
        job's are carved from root's.  Recorded first in every session, so replay starts the same."""
        for limits in (root or {}, default or {}):
            for kind, amount in limits.items():
                if not _finite_amount(amount):
                    return _no(ErrorCode.BAD_REQUEST, f"bad limit {kind!r}={amount!r}")
        r, d = self.jobs[ROOT], self.jobs[DEFAULT_JOB]
        if r.carved or d.spent or d.running or any(j.running for j in self.jobs.values()):
            return _no(ErrorCode.REFUSED, "configure only before any job or request")
        r.limits = {k: float(v) for k, v in (root or {}).items()}
        d.limits = {k: float(v) for k, v in (default or {}).items()}
        for j in self.jobs.values():
            j.holders = j.by_kind = None
        for kind, amount in d.limits.items():
            if kind in r.limits:
                if amount > r.limits[kind]:
                    return _no(ErrorCode.BUDGET_EXCEEDED, f"default {kind} {amount:g} exceeds root's {r.limits[kind]:g}")
                r.carved[kind] = amount
                d.carved_from[kind] = ROOT
        return {"ok": True, "root": {k: _r(v) for k, v in r.limits.items()},
                "default": {k: _r(v) for k, v in d.limits.items()}}

    def open(self, now: float, job: str, parent: str | None = None, limits: dict[str, Any] | None = None,
             priority: Any = 0, owner: str | None = None) -> dict[str, Any]:
        """Open ``job`` under ``parent`` (root by default).  ``owner``: the principal opening it
        (an input, so the decision log restores owners); a child is owned by its parent's owner."""
        if not isinstance(job, str) or not job or job in self.jobs and not self.jobs[job].closed:
            return _no(ErrorCode.BAD_REQUEST, f"job name {job!r} invalid or in use")
        if not isinstance(priority, int) or isinstance(priority, bool) \
                or not P.PRIORITY_MIN <= priority <= P.PRIORITY_MAX:
            return _no(ErrorCode.BAD_REQUEST, f"priority must be an integer in [{P.PRIORITY_MIN}, {P.PRIORITY_MAX}], "
                                              f"got {priority!r}")
        limits = dict(limits or {})
        for kind, amount in limits.items():
            if not isinstance(kind, str) or not _finite_amount(amount):
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
        j = Job(job, p, {k: float(v) for k, v in limits.items()}, priority, now, wall_anchor=now,
                owner=p.owner if p.owner is not None else owner)
        for kind, h in carve.items():
            if kind == WALL:
                self._wall_settle(h, now)
            h.carved[kind] = h.carved.get(kind, 0.0) + j.limits[kind]
            j.carved_from[kind] = h.name
            if kind == WALL:
                self._wall_rearm(h, now)
        self.jobs[job] = j
        p.children.add(job)
        if j.owner is not None:
            self._owned[j.owner] += 1
            self._by_owner.setdefault(j.owner, {})[job] = None
            if j.limits:
                self._kinds[j.owner] += len(j.limits)
        return {"ok": True, "limits": {k: _r(v) for k, v in j.limits.items()}}

    def close(self, now: float, job: str) -> dict[str, Any]:
        """Close ``job`` and its children, returning what they did not spend.  Refused while any
        request of the job or its children is in flight (cancel them first)."""
        j = self.jobs.get(job)
        if j is None or j.closed or job in (ROOT, DEFAULT_JOB):
            return _no(ErrorCode.REFUSED, f"cannot close job {job!r}")
        busy = self.in_flight(j)
        if busy:
            return _no(ErrorCode.REFUSED, f"job {job!r} has {busy} request(s) in flight; cancel them or let "
                                          "them finish first")
        return self._close(now, j)

    def _close(self, now: float, j: Job) -> dict[str, Any]:
        job = j.name
        for child in list(j.children):
            self._close(now, self.jobs[child])
        if WALL in j.limits:
            self._wall_settle(j, now)
        for rid, (rjob, *_) in list(self._reservations.items()):
            if rjob == job:
                self.release(now, rid)
        for kind, hname in j.carved_from.items():
            h = self.jobs[hname]
            if kind == WALL:
                self._wall_settle(h, now)
            h.carved[kind] = h.carved.get(kind, 0.0) - j.limits[kind]
            h.spent[kind] = h.spent.get(kind, 0.0) + j.spent.get(kind, 0.0)
            if kind == WALL:
                self._wall_rearm(h, now)
        j.closed = True
        if j.parent is not None:
            j.parent.children.discard(job)
        # A closed job is forgotten (its spending went to its holders above): opening and
        # closing jobs in a loop does not grow the kernel's memory.
        del self.jobs[job]
        if j.owner is not None:
            self._owned[j.owner] -= 1
            if not self._owned[j.owner]:
                del self._owned[j.owner]
            mine = self._by_owner.get(j.owner)
            if mine is not None:
                mine.pop(job, None)
                if not mine:
                    del self._by_owner[j.owner]
            held = _kind_entries(j)
            if held:
                self._kinds[j.owner] -= held
                if not self._kinds[j.owner]:
                    del self._kinds[j.owner]
        return {"ok": True, "spent": {k: _r(v) for k, v in j.total.items()}}

    def admit(self, now: float, job: str, budget: dict[str, Any] | None = None, start: bool = False) -> dict[str, Any]:
        """Admit a request of ``job`` asking for ``budget``; returns the granted (clamped) budget.
        ``start``: an admitted request also starts at once (one decision instead of admit +
        start; a log without it replays its separate ``start`` lines the same)."""
        j = self.jobs.get(job)
        if j is None or j.closed:
            return _unknown_job(job)
        a: Job | None = j
        while a is not None:  # blocked_by's common case first: nothing on the chain is exhausted
            if a.exhausted is not None:
                why = self.blocked_by(j)
                if why:
                    return _no(ErrorCode.BUDGET_EXCEEDED, why)
                break
            a = a.parent
        limited = j.holders if j.holders is not None else self._holders(j)
        granted: dict[str, float] = {}
        isfinite = math.isfinite
        short = None  # the first kind with nothing left
        if not budget:
            for kind, lim in limited:
                rem = lim.limits[kind] - lim.spent.get(kind, 0.0) - lim.carved.get(kind, 0.0) - lim.reserved.get(kind, 0.0)
                if kind == WALL and lim.wall_running:
                    rem -= lim.wall_running * (now - lim.wall_anchor) * 1000.0
                if isfinite(rem):  # granted: what is left (as the general case below with nothing asked)
                    # (round(x, 6) of an integral x is x: skipped, as in _r)
                    amount = granted[kind] = (rem if rem % 1.0 == 0.0 else round(rem, 6)) if rem > 0.0 else 0.0
                    if amount <= 0 and short is None and kind in COMPUTE:
                        short = kind
        else:
            holders: list[tuple[str, Job | None]] = limited  # type: ignore[assignment]
            if not budget.keys() <= {k for k, _ in holders}:
                # Kinds the request asks for that no job limits: granted as asked (unlimited).
                found: dict[str, Job | None] = {**dict.fromkeys(budget), **dict(holders)}
                holders = sorted(found.items())
            asked = budget.get
            for kind, h in holders:
                if h is None:
                    rem = INF
                else:
                    rem = h.limits[kind] - h.spent.get(kind, 0.0) - h.carved.get(kind, 0.0) - h.reserved.get(kind, 0.0)
                    if kind == WALL and h.wall_running:
                        rem -= h.wall_running * (now - h.wall_anchor) * 1000.0
                got = asked(kind, INF)
                if rem < got:
                    got = rem
                if isfinite(got):
                    # as _r(max(0.0, got)): rounded for the log, never below zero
                    amount = granted[kind] = (got if got % 1.0 == 0.0 and type(got) is not bool else round(got, 6)) if got > 0.0 else 0.0
                    if amount <= 0 and short is None and (kind in budget or kind in COMPUTE):
                        short = kind
        if short is not None:
            return _no(ErrorCode.BUDGET_EXCEEDED, f"no {short} left in job {job!r}", granted=granted)
        if start:  # as self.start(now, job), on the job found above
            j.running += 1
            assert j.by_kind is not None  # built with j.holders
            w = j.by_kind.get(WALL)
            if w is not None:
                running = w.wall_running
                if running:  # (as _wall_settle(w, now))
                    used = running * (now - w.wall_anchor) * 1000.0
                    w.spent[WALL] = w.spent.get(WALL, 0.0) + used
                    w.total[WALL] = w.total.get(WALL, 0.0) + used
                w.wall_anchor = now
                w.wall_running = running + 1
                self._wall_rearm(w, now)
        return {"ok": True, "granted": granted}

    def start(self, now: float, job: str) -> dict[str, Any]:
        """A request of ``job`` began running (wall time starts to count)."""
        j = self.jobs.get(job)
        if j is not None:
            j.running += 1
        h = self._wall_holder(job)
        if h is not None:
            self._wall_settle(h, now)
            h.wall_running += 1
            self._wall_rearm(h, now)
        return {"ok": True}

    def queue(self, now: float, job: str) -> dict[str, Any]:
        """A request of ``job`` was admitted (:meth:`start`) but waits for a slot: its wall time
        stops counting until :meth:`dispatch` (queued time never spends ``wall_ms``).  It still
        counts as running (a job is not closed under a queued request)."""
        h = self._wall_holder(job)
        if h is not None and h.wall_running > 0:
            self._wall_settle(h, now)
            h.wall_running -= 1
            self._wall_rearm(h, now)
        return {"ok": True}

    def dispatch(self, now: float, job: str) -> dict[str, Any]:
        """A queued request of ``job`` got its slot: its wall time counts from now."""
        h = self._wall_holder(job)
        if h is not None:
            self._wall_settle(h, now)
            h.wall_running += 1
            self._wall_rearm(h, now)
        return {"ok": True}

    def finish(self, now: float, job: str, spent: dict[str, Any] | None = None, queued: bool = False) -> dict[str, Any]:
        """A request of ``job`` ended (wall time stops counting; ``queued``: it ended while
        waiting for a slot, its wall time had already stopped).  ``spent``: its last charges,
        taken first (one decision instead of ``charge`` + ``finish``; the answer then lists the
        jobs they exhausted, as :meth:`charge`'s does)."""
        out: dict[str, Any] = {"ok": True}
        if spent:
            out["exhausted"] = self.charge(now, job, spent)["exhausted"]
        j = self.jobs.get(job)
        if j is not None:
            if j.running > 0:
                j.running -= 1
            h = self.holder(j, WALL)
            if h is not None and h.wall_running > 0 and not queued:
                running = h.wall_running  # (as _wall_settle(h, now))
                used = running * (now - h.wall_anchor) * 1000.0
                h.spent[WALL] = h.spent.get(WALL, 0.0) + used
                h.total[WALL] = h.total.get(WALL, 0.0) + used
                h.wall_anchor = now
                h.wall_running = running - 1
                self._wall_rearm(h, now)
        return out

    def charge(self, now: float, job: str, spent: dict[str, Any]) -> dict[str, Any]:
        """Charge measured or reported spending; returns the jobs this exhausted."""
        j = self.jobs.get(job)
        if j is None:
            return {"ok": False, "exhausted": []}
        exhausted = []
        for kind in sorted(spent) if len(spent) > 1 else spent:  # (one kind, the common case: no sort)
            amount = spent[kind]
            if kind == WALL or not isinstance(amount, (int, float)) or amount <= 0:
                continue  # wall time is accounted continuously by start/finish
            if kind in j.total or kind in j.limits or j.owner is None:
                j.total[kind] = j.total.get(kind, 0.0) + amount
            elif self._kinds.get(j.owner, 0) < self.max_kinds:
                j.total[kind] = amount
                self._kinds[j.owner] += 1
            else:
                self.kinds_dropped += 1  # at the bound: a new kind is not kept (it limits nothing here)
            h = self.holder(j, kind)
            if h is None:
                continue
            h.spent[kind] = h.spent.get(kind, 0.0) + amount
            if kind in COMPUTE and h.remaining(kind) <= 1e-9 and h.exhausted is None:
                h.exhausted = kind
                exhausted.append(h.name)
        return {"ok": True, "exhausted": exhausted}

    def tick(self, now: float) -> dict[str, Any]:
        """Exhaust every job whose wall budget has run out by ``now``."""
        exhausted = []
        heap = self._wall_heap
        while self.next_deadline() <= now:  # the top entry is then its job's exact deadline
            _, name = heapq.heappop(heap)
            j = self.jobs[name]
            self._wall_settle(j, now)
            j.exhausted = WALL
            j.wall_deadline = j.wall_bound = INF
            exhausted.append(name)
        return {"ok": True, "exhausted": exhausted}

    def reserve(self, now: float, job: str, resource: str, amount: Any = 1, commit: bool = False,
                lease: Any = RESERVATION_LEASE, up_to: bool = False, reservation: str | None = None,
                holder: str | None = None) -> dict[str, Any]:
        """Atomically take ``amount`` of a counted resource: granted (with a reservation id, or
        committed at once when ``commit``) or refused; never both.

        ``up_to``: take ``min(amount, what is left)`` instead (whole units when ``amount`` is an
        integer), refused only when nothing is left; the answer's ``granted`` says how much.

        ``reservation``: the id to give a held reservation (the kernel draws it at random, so
        no one guesses another's; an input, so replay is exact), else a counter; ``holder``: the
        principal taking it (it may release, commit and renew it).

        ``amount`` and ``lease`` are typed Any on purpose: they are checked here, and a bool or a
        str is refused with a value; under ``float`` compiled (mypyc) code would coerce a bool to
        1.0 or raise TypeError at the call instead (as ``renew``'s ``reservations``)."""
        j = self.open_job(job)
        if j is None:
            return _unknown_job(job)
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
        if isinstance(reservation, str) and reservation not in self._reservations:
            rid = reservation
        else:
            rid = f"{self.session}r{self._rid_next}"
            self._rid_next += 1
        self._reservations[rid] = (job, resource, float(amount), now + lease, holder)
        if holder is not None:
            self.held_by[holder] += 1
        heapq.heappush(self._expiry_heap, (now + lease, rid))
        if h is not None:
            h.reserved[resource] = h.reserved.get(resource, 0.0) + amount
        return {"ok": True, "reservation": rid, "remaining": _r(self.remaining(j, resource, now)), **granted}

    def commit(self, now: float, reservation: str) -> dict[str, Any]:
        entry = self._reservations.pop(reservation, None)
        if entry is None:
            return _no(ErrorCode.REFUSED, f"unknown or expired reservation {reservation!r}")
        job, resource, amount = entry[:3]
        self._unhold(entry[4])
        self._unreserve(job, resource, amount)
        out = self.charge(now, job, {resource: amount})
        return {"ok": True, "committed": amount, "exhausted": out["exhausted"]}

    def release(self, now: float, reservation: str) -> dict[str, Any]:
        entry = self._reservations.pop(reservation, None)
        if entry is None:
            return _no(ErrorCode.REFUSED, f"unknown or expired reservation {reservation!r}")
        job, resource, amount = entry[:3]
        self._unhold(entry[4])
        self._unreserve(job, resource, amount)
        return {"ok": True, "released": amount}

    def _unhold(self, holder: str | None) -> None:
        if holder is not None:
            self.held_by[holder] -= 1
            if self.held_by[holder] <= 0:
                del self.held_by[holder]

    def renew(self, now: float, reservations: Any, lease: Any = RESERVATION_LEASE) -> dict[str, Any]:
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
            self._reservations[rid] = (*entry[:3], now + lease, entry[4])
            heapq.heappush(self._expiry_heap, (now + lease, rid))
            renewed.append(rid)
        return {"ok": True, "renewed": renewed, "unknown": unknown}

    def next_expiry(self) -> float:
        """When the earliest held lease runs out (INF: none held); :meth:`expire` has something
        to do only from then on, so the kernel runs (and logs) it only then."""
        heap = self._expiry_heap
        while heap:
            exp, rid = heap[0]
            entry = self._reservations.get(rid)
            if entry is not None and entry[3] == exp:
                return exp
            heapq.heappop(heap)
        return INF

    def expire(self, now: float) -> dict[str, Any]:
        """Release reservations whose lease ran out (presumed abort)."""
        gone = [rid for rid, entry in self._reservations.items() if entry[3] <= now]
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
        return None if j is None else self.holder(j, WALL)

    def _wall_settle(self, h: Job, now: float) -> None:
        if h.wall_running:
            used = h.wall_running * (now - h.wall_anchor) * 1000.0
            h.spent[WALL] = h.spent.get(WALL, 0.0) + used
            h.total[WALL] = h.total.get(WALL, 0.0) + used
        h.wall_anchor = now

    def _wall_rearm(self, h: Job, now: float) -> None:
        if h.exhausted is not None or WALL not in h.limits:
            return
        running = h.wall_running
        if running:
            rem = h.limits[WALL] - h.spent.get(WALL, 0.0) - h.carved.get(WALL, 0.0) - h.reserved.get(WALL, 0.0)
            left = (rem if rem > 0.0 else 0.0) / 1000.0  # as max(0.0, h.remaining(WALL)) / 1000
            deadline = h.wall_deadline = now + left / running
            if deadline < h.wall_bound:
                # The heap holds a lower bound, not the deadline itself: one that stays below the
                # deadline while up to twice as many requests run, so a start pushes only when the
                # number in flight doubles and a finish (a later deadline) never pushes.
                # next_deadline() turns a bound at the top into the exact deadline.
                bound = h.wall_bound = now + left / (2 * running)
                heap = self._wall_heap
                heapq.heappush(heap, (bound, h.name))
                if len(heap) > 64 + 2 * len(self.jobs):
                    # Entries superseded by a lower bound are dropped lazily at the top; compact the
                    # rest so the heap stays bounded by the number of jobs.
                    heap[:] = [(d, n) for d, n in heap if self._wall_valid(d, n)]
                    heapq.heapify(heap)
        else:
            h.wall_deadline = INF

    def _wall_valid(self, bound: float, name: str) -> bool:
        """Whether heap entry ``(bound, name)`` is its job's live one (not superseded, the job
        open and not exhausted)."""
        j = self.jobs.get(name)
        return j is not None and not j.closed and j.wall_bound == bound and j.exhausted is None

    def next_deadline(self) -> float:
        """The earliest wall deadline of an open job that is not exhausted (INF: none).
        Invariant: every such job with a finite ``wall_deadline`` has a live heap entry at its
        ``wall_bound`` <= ``wall_deadline``; a bound found at the top is replaced by the exact
        deadline, so what is returned is exact (the kernel logs a ``tick`` only then)."""
        heap = self._wall_heap
        while heap:
            bound, name = heap[0]
            if not self._wall_valid(bound, name):
                heapq.heappop(heap)
                continue
            j = self.jobs[name]
            deadline = j.wall_deadline
            if bound == deadline:
                return deadline
            if deadline < INF:
                j.wall_bound = deadline
                heapq.heapreplace(heap, (deadline, name))
            else:
                j.wall_bound = INF
                heapq.heappop(heap)
        return INF

    # -- invariants ---------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant: every open job's carve-outs
        are recorded on its holders and its reservations on theirs; nothing open is over its
        limit by more than rounding unless it is exhausted (compute kinds); counts of running
        requests are not negative; owners' job counts match the open jobs; every job whose wall
        time runs out at a finite time has a heap entry at or before it."""
        carved: dict[tuple[str, str], float] = collections.defaultdict(float)
        reserved: dict[tuple[str, str], float] = collections.defaultdict(float)
        owned: collections.Counter[str] = collections.Counter()
        for j in self.jobs.values():
            if j.closed:
                continue
            assert j.running >= 0 and j.wall_running >= 0, f"job {j.name}: negative running count"
            if j.owner is not None:
                owned[j.owner] += 1
            if j.parent is not None:
                assert j.name in j.parent.children, f"job {j.name} missing from its parent's children"
            for kind, hname in j.carved_from.items():
                carved[hname, kind] += j.limits[kind]
        for job, kind, amount, _exp, _holder in self._reservations.values():
            rj = self.jobs.get(job)
            h = self.holder(rj, kind) if rj is not None else None
            if h is not None:
                reserved[h.name, kind] += amount
        for j in self.jobs.values():
            if j.closed:
                continue
            for kind in set(j.carved) | {k for (n, k) in carved if n == j.name}:
                assert abs(j.carved.get(kind, 0.0) - carved[j.name, kind]) < 1e-6, f"job {j.name}: carved {kind}"
            for kind in set(j.reserved) | {k for (n, k) in reserved if n == j.name}:
                assert abs(j.reserved.get(kind, 0.0) - reserved[j.name, kind]) < 1e-6, f"job {j.name}: reserved {kind}"
        assert {k: v for k, v in self._owned.items() if v} == dict(owned), "owners' job counts"
        kinds: collections.Counter[str] = collections.Counter()
        for j in self.jobs.values():
            if not j.closed and j.owner is not None and _kind_entries(j):
                kinds[j.owner] += _kind_entries(j)
        assert {k: v for k, v in self._kinds.items() if v} == dict(kinds), "owners' kind counts"
        by_owner: dict[str, set[str]] = {}
        for j in self.jobs.values():
            if not j.closed and j.owner is not None:
                by_owner.setdefault(j.owner, set()).add(j.name)
        assert {o: set(ns) for o, ns in self._by_owner.items()} == by_owner, "owners' job index"
        held = collections.Counter(e[4] for e in self._reservations.values() if e[4] is not None)
        assert {k: v for k, v in self.held_by.items() if v} == dict(held), "holders' reservation counts"
        in_heap = set(self._wall_heap)
        for j in self.jobs.values():
            if not j.closed and j.exhausted is None and math.isfinite(j.wall_deadline):
                assert j.wall_bound <= j.wall_deadline and (j.wall_bound, j.name) in in_heap, \
                    f"job {j.name}: its wall deadline has no entry at or below it in the heap"

    # -- durable state ------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """The whole ledger as plain data (JSON-safe but for infinities, which JSON lines carry as
        ``Infinity``): what a decision-log snapshot records.  ``Ledger.load(dump())`` takes the
        same decisions as this ledger from here on."""
        jobs = []
        for j in self.jobs.values():  # insertion order: every parent before its children
            d = {f.name: getattr(j, f.name) for f in dataclasses.fields(j) if f.name not in _NOT_DUMPED}
            d["parent"] = j.parent.name if j.parent is not None else None
            d["children"] = sorted(j.children)
            jobs.append(json.loads(json.dumps(d)))
        return {"session": self.session, "rid_next": self._rid_next, "jobs": jobs,
                "reservations": {rid: list(e) for rid, e in self._reservations.items()}}

    @classmethod
    def load(cls, state: dict[str, Any]) -> "Ledger":
        """The ledger :meth:`dump` recorded."""
        led = cls(session=state.get("session", ""))
        led.jobs.clear()
        names = {f.name for f in dataclasses.fields(Job)}
        for d in state["jobs"]:
            fields = {k: v for k, v in d.items() if k in names and k not in _NOT_DUMPED}
            j = Job(parent=led.jobs[d["parent"]] if d.get("parent") is not None else None, **fields)
            j.children = set(d.get("children", ()))
            led.jobs[j.name] = j
            if math.isfinite(j.wall_deadline):
                heapq.heappush(led._wall_heap, (j.wall_deadline, j.name))
                j.wall_bound = j.wall_deadline
        for rid, (job, kind, amount, exp, *holder) in state.get("reservations", {}).items():
            led._reservations[rid] = (job, kind, float(amount), float(exp), holder[0] if holder else None)
            if holder and holder[0] is not None:
                led.held_by[holder[0]] += 1
            heapq.heappush(led._expiry_heap, (float(exp), rid))
        led._rid_next = int(state.get("rid_next", 1))
        led._owned.update(j.owner for j in led.jobs.values() if j.owner is not None and not j.closed)
        for j in led.jobs.values():
            if j.owner is not None and not j.closed:
                led._by_owner.setdefault(j.owner, {})[j.name] = None
                if _kind_entries(j):
                    led._kinds[j.owner] += _kind_entries(j)
        return led

    def snapshot(self, now: float, owner: str | None = None, skip: int = 0, limit: int | None = None,
                 names: Iterable[str] | None = None) -> dict[str, Any]:
        """Every open job's limits, spend and remainder (for mmi.stats and the status CLI);
        ``owner``: only that principal's jobs; ``skip``/``limit``: a page of them (in the
        ledger's order); ``names``: only these (what a non-operator's stats cost: one page)."""
        out: dict[str, Any] = {}
        if names is None and owner is not None:  # the owner's own index: its jobs, not the ledger's
            names = list(self._by_owner.get(owner, ()))
        jobs = self.jobs.values() if names is None else (self.jobs[n] for n in names if n in self.jobs)
        for j in jobs:
            if j.closed or owner is not None and j.owner != owner:
                continue
            if skip:
                skip -= 1
                continue
            if limit is not None and len(out) >= limit:
                break
            spent = dict(j.total)
            if WALL in j.limits and j.wall_running:
                spent[WALL] = spent.get(WALL, 0.0) + j.wall_running * (now - j.wall_anchor) * 1000.0
            out[j.name] = {
                "parent": j.parent.name if j.parent else None,
                "limits": j.limits,
                "spent": {k: _r(v) for k, v in spent.items()},
                "remaining": {k: _r(max(0.0, self.remaining(j, k, now))) for k in j.limits},
                "exhausted": j.exhausted,
                "running": j.running,
                "owner": j.owner,
            }
        return out
