"""The escalation ladder: a worker is never trusted to stop.

When the kernel answers a request it has already dispatched -- its budget ran out, its deadline
passed, its owner or an operator cancelled it -- the router publishes the cooperative ``cancel``
and keeps the request in its worker's slot as a *tombstone* until the worker's own late FINAL
(kernel/router.py, ``fail_request``).  The ladder watches those tombstones:

1. the cooperative order is out (the router sent it); the worker should answer at its next safe
   point;
2. a worker still holding the request ``freeze_grace`` seconds later (default 20 ms; or the
   longer grace its service declared, ``[[service]] grace_ms``: scch answers when its bounded
   solver call returns, and is never frozen inside that bound) is **frozen** (kernel/enforce.py: the cgroup freezer stops its whole process tree atomically; on
   the signals backend, SIGSTOP): it burns nothing more;
3. ``kill_grace`` seconds after the freeze (default 1 s) it is **thawed** for
   :data:`ANSWER_GRACE_S` (100 ms) to answer the cancel it already holds -- a cooperative worker
   that was merely slow on a busy machine answers at its next safe point and lives;
4. still holding it then, or dropped by the liveness check while frozen or thawed, it is
   **killed** (its whole group) and the supervisor restarts it (OTP: let it crash).  The kill never blocks: SIGKILL to every process of the group, then the
   group is thawed (on cgroup v1 a frozen task dies only once thawed).

Nothing frozen outlives the kernel: its shutdown thaws every group before it stops the services,
the enforcer thaws and kills its groups at exit (``atexit``), and a kernel killed outright
(SIGKILL) leaves groups that the next start thaws and kills (kernel/enforce.py).  A freeze never
blocks the kernel either: the shell writes it and waits at most :data:`FREEZE_WAIT_S` for the OS
to report it (the kill follows anyway).

A worker that also serves live requests (a multi-slot worker: decode's sessions, another
principal's call) is not frozen for one request's tombstone while it does: the freeze would stop
the innocent requests too.  Its rungs start once it holds only tombstones (the live requests end
within their own budgets); until then only the cooperative cancel acts on it.

A worker that answers (its FINAL frees the slot) before a rung is left alone; a frozen one cannot
answer until it is thawed.  Every rung is a decision-log record
(``enforce``: the rung, the child, its pid, the request's token, and the CPU seconds the OS measured
for the child's group at that moment), so what a request burnt after its cancel is on record.

:class:`Ladder` is the pure part (tombstones in, actions out, ``now`` passed in); :func:`run` is
the kernel's shell, a task polling the router every :data:`POLL_S` seconds (the router is only
read; no hook of the core is needed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from kernel.enforce import FreezeTimeout

log = logging.getLogger("reca.ladder")

__all__ = ["ANSWER_GRACE_S", "FREEZE_WAIT_S", "POLL_S", "Action", "Ceilings", "Held", "Ladder", "run", "single_slot_grants"]

#: How often the shell looks for tombstones, seconds (adds at most this to each rung).
POLL_S = 0.002
#: After ``kill_grace`` frozen, the worker is thawed and has this long to answer its cancel before
#: the kill (seconds): a cooperative worker that was only slow on a busy machine is not killed.
ANSWER_GRACE_S = 0.1
#: Longest the shell waits for a freeze to be reported, seconds (the kernel's loop is blocked
#: meanwhile); one not reported by then is recorded ``landed: false`` and lands on its own.
FREEZE_WAIT_S = 0.005


@dataclasses.dataclass(frozen=True)
class Held:
    """A tombstone: request ``token`` answered but still in the slot of the worker with ``pid``."""

    token: bytes
    pid: int
    worker: bytes  # the worker's routing id
    grace: float = 0.0  # the grace its service declared, seconds
    #: The worker also serves live (unanswered) requests: freezing or killing it would stop them too.
    shared: bool = False


@dataclasses.dataclass(frozen=True)
class Action:
    rung: str  # "freeze", "thaw" or "kill"
    pid: int
    token: bytes
    held_s: float  # since the tombstone was first seen


@dataclasses.dataclass
class _Track:
    pid: int
    worker: bytes
    seen: float
    grace: float = 0.0
    frozen: float | None = None
    thawed: float | None = None


class Ladder:
    """Invariant: a token is tracked from its first sighting as a tombstone until its worker
    answers it (gone while the worker is still registered) or it was killed.

    Rungs: ``freeze`` at ``seen + grace``; ``thaw`` at ``frozen + kill_grace`` -- the worker gets
    ``answer_grace`` to answer the cancel it already has (a cooperative worker merely descheduled
    on a busy machine answers at its next safe point and is not killed); ``kill`` at ``thawed +
    answer_grace`` if it still holds the request, or at once when its worker was dropped while
    frozen or thawed."""

    def __init__(self, freeze_grace: float = 0.020, kill_grace: float = 1.0, answer_grace: float = ANSWER_GRACE_S) -> None:
        if freeze_grace < 0 or kill_grace < 0 or answer_grace < 0:
            raise ValueError("graces must be >= 0")
        self.freeze_grace = freeze_grace
        self.kill_grace = kill_grace
        self.answer_grace = answer_grace
        self.tracks: dict[bytes, _Track] = {}
        self.counts = {"frozen": 0, "thawed": 0, "killed": 0, "answered": 0}

    def observe(self, held: Iterable[Held], live_workers: set[bytes], now: float) -> list[Action]:
        """The rungs due at ``now``, given the tombstones now held and the registered workers."""
        seen = set()
        shared = set()
        for h in held:
            seen.add(h.token)
            if h.shared:
                shared.add(h.token)
            if h.token not in self.tracks:
                self.tracks[h.token] = _Track(h.pid, h.worker, now, max(self.freeze_grace, h.grace))
        out: list[Action] = []
        done: set[tuple[str, int]] = set()  # one action of each rung per process

        def act(rung: str, t: _Track, token: bytes) -> None:
            if (rung, t.pid) not in done:
                done.add((rung, t.pid))
                out.append(Action(rung, t.pid, token, now - t.seen))
                self.counts[{"freeze": "frozen", "thaw": "thawed", "kill": "killed"}[rung]] += 1

        for token, t in list(self.tracks.items()):
            live = t.worker in live_workers
            if token not in seen and live:
                del self.tracks[token]  # its worker answered it
                self.counts["answered"] += 1
                continue
            if t.frozen is None:
                # never freeze a worker for one request while it serves others (they would stop too,
                # another principal's among them): the rung waits until it holds only tombstones
                if now - t.seen >= t.grace and token not in shared:
                    t.frozen = now
                    act("freeze", t, token)
            elif not live or (t.thawed is not None and now - t.thawed >= self.answer_grace):
                del self.tracks[token]
                act("kill", t, token)
            elif t.thawed is None and now - t.frozen >= self.kill_grace:
                t.thawed = now
                act("thaw", t, token)
        return out

    def next_due(self) -> float | None:
        """When the next rung falls due (None: nothing tracked)."""
        times = [
            t.seen + t.grace if t.frozen is None
            else t.frozen + self.kill_grace if t.thawed is None
            else t.thawed + self.answer_grace
            for t in self.tracks.values()
        ]
        return min(times) if times else None


class Ceilings:
    """Per-request memory ceilings on single-slot workers: while a request with a ``mem_bytes``
    grant holds the only slot of a worker, the worker's group gets a ceiling of what it uses plus
    that grant (kernel/supervisor.py ``memory_ceiling``); when the request leaves the slot (its
    FINAL, or its tombstone's), the service's own ceiling is back.  Past the ceiling the OOM
    killer kills the worker: the request is answered ``memory_exceeded``.

    Invariant: ``applied`` maps a worker pid to the request whose ceiling its group has now."""

    def __init__(self) -> None:
        self.applied: dict[int, bytes] = {}

    def observe(self, held: dict[int, tuple[bytes, int | None]]) -> tuple[list[tuple[int, bytes, int]], list[int]]:
        """``held``: worker pid -> (the token in its only slot, that request's ``mem_bytes`` grant
        or None).  Returns (ceilings to set: pid, token, bytes; pids whose ceiling to lift)."""
        lift = [pid for pid, token in self.applied.items() if held.get(pid, (None,))[0] != token]
        for pid in lift:
            del self.applied[pid]
        put = []
        for pid, (token, mem) in held.items():
            if mem is not None and pid not in self.applied:
                self.applied[pid] = token
                put.append((pid, token, mem))
        return put, lift


def single_slot_grants(router: Any, admission: Any) -> dict[int, tuple[bytes, int | None]]:
    """worker pid -> (token, mem_bytes grant or None) of each single-slot worker holding one
    request (read only)."""
    out: dict[int, tuple[bytes, int | None]] = {}
    tracks = getattr(admission, "tracks", {})
    for worker in router.workers.values():
        if worker.pid is None or worker.capacity != 1 or len(worker.inflight) != 1:
            continue
        (token,) = worker.inflight
        track = tracks.get(token)
        mem = track.granted.get("mem_bytes") if track is not None else None
        out[worker.pid] = (token, int(mem) if isinstance(mem, (int, float)) and mem > 0 else None)
    return out


class _Procs(Protocol):
    def child_of_pid(self, pid: int) -> str | None: ...
    def grace_of(self, name: str) -> float: ...
    def freeze(self, name: str, timeout: float = ...) -> float: ...
    def thaw(self, name: str) -> None: ...
    def kill_group(self, name: str) -> int: ...
    def cpu_seconds(self, name: str) -> float | None: ...
    def memory_ceiling(self, name: str, headroom: int | None) -> int | None: ...
    def oom_kills(self, name: str) -> int | None: ...


def tombstones(router: Any, procs: _Procs | None = None) -> tuple[list[Held], set[bytes]]:
    """The router's answered-but-held requests (with their services' declared graces, from
    ``procs``) and its registered workers (read only)."""
    held = []
    for identity, worker in router.workers.items():
        if worker.pid is None:
            continue
        grace = None
        shared = any(not req.done for req in worker.inflight.values())
        for token, req in worker.inflight.items():
            if req.done:
                if grace is None:
                    name = procs.child_of_pid(worker.pid) if procs is not None else None
                    grace = procs.grace_of(name) if procs is not None and name is not None else 0.0
                held.append(Held(token, worker.pid, identity, grace, shared))
    return held, set(router.workers)


def apply(actions: list[Action], procs: _Procs, record: Any, now: float, frozen: dict[int, str] | None = None) -> None:
    """Carry out the rungs through the supervisor; each is recorded (``record(op, now, in, out)``).
    ``frozen`` (pid -> child, kept by the caller across calls): a kill whose process is gone
    already (it died, the supervisor restarted the child) thaws the group it froze instead -- a
    group is never left frozen, and the restarted process never starts frozen."""
    frozen = {} if frozen is None else frozen
    for a in actions:
        name = procs.child_of_pid(a.pid)
        if a.rung in ("thaw", "kill") and name is None and a.pid in frozen:
            gone = frozen.pop(a.pid) if a.rung == "kill" else frozen[a.pid]
            try:
                procs.thaw(gone)
                out_gone: dict[str, Any] = {"ok": True, "thawed": True, "why": "its process is gone"}
            except (LookupError, OSError, RuntimeError) as exc:
                out_gone = {"ok": False, "why": str(exc)}
            record("enforce", now, {"rung": a.rung, "child": gone, "pid": a.pid, "token": a.token.hex()}, out_gone)
            continue
        if name is None:
            log.warning(
                "cannot %s pid %d (request %s): not a process this kernel supervises", a.rung, a.pid, a.token.hex()
            )
            record(
                "enforce",
                now,
                {"rung": a.rung, "pid": a.pid, "token": a.token.hex()},
                {"ok": False, "why": "not supervised"},
            )
            continue
        try:
            if a.rung == "freeze":
                frozen[a.pid] = name
                try:
                    out: dict[str, Any] = {"ok": True, "landed": True,
                                           "freeze_s": procs.freeze(name, FREEZE_WAIT_S)}
                except FreezeTimeout:  # written; the OS stops the group when it gets to it
                    out = {"ok": False, "landed": False, "why": f"not reported frozen within {FREEZE_WAIT_S:g} s"}
            elif a.rung == "thaw":
                procs.thaw(name)
                out = {"ok": True}
            else:
                frozen.pop(a.pid, None)
                out = {"ok": True, "killed": procs.kill_group(name)}
        except (LookupError, OSError, RuntimeError) as exc:
            out = {"ok": False, "why": str(exc)}
        out["cpu_s"] = procs.cpu_seconds(name)
        log.warning(
            "ladder: %s %s (pid %d): request %s held %.1f ms past its answer",
            a.rung,
            name,
            a.pid,
            a.token.hex(),
            a.held_s * 1e3,
        )
        record(
            "enforce",
            now,
            {"rung": a.rung, "child": name, "pid": a.pid, "token": a.token.hex(), "held_ms": round(a.held_s * 1e3, 3)},
            out,
        )


class _CeilingShell:
    """Carries out :class:`Ceilings` through the supervisor and answers a request whose worker
    the OOM killer took at its ceiling with ``memory_exceeded``."""

    def __init__(self, router: Any, procs: _Procs, admission: Any) -> None:
        self.router, self.procs, self.admission = router, procs, admission
        self.pure = Ceilings()
        self.where: dict[int, tuple[str, int, bytes]] = {}  # pid -> (child, its OOM kills, token)

    def step(self, now: float) -> None:
        put, lift = self.pure.observe(single_slot_grants(self.router, self.admission))
        for pid in lift:
            self._check_oom(pid, now)
            name = self.where.pop(pid, (None, 0, b""))[0]
            if name is not None:
                with _suppress_enforce():
                    self.procs.memory_ceiling(name, None)
        for pid, token, mem in put:
            name = self.procs.child_of_pid(pid)
            if name is None:
                continue
            with _suppress_enforce():
                ceiling = self.procs.memory_ceiling(name, mem)
                self.where[pid] = (name, self.procs.oom_kills(name) or 0, token)
                self.admission.record("enforce", now, {"rung": "memory_ceiling", "child": name, "pid": pid,
                                                       "token": token.hex(), "mem_bytes": mem},
                                      {"ok": True, "ceiling": ceiling})
        for pid in list(self.where):
            self._check_oom(pid, now)

    def _check_oom(self, pid: int, now: float) -> None:
        if pid not in self.where:
            return
        name, before, token = self.where[pid]
        kills = self.procs.oom_kills(name)
        if kills is None or kills <= before:
            return
        self.where[pid] = (name, kills, token)
        with _suppress_enforce():  # its worker is dead or dying: the restarted one starts without it
            self.procs.memory_ceiling(name, None)
        req = self.router.inflight.get(token)
        if req is None:  # its tombstone: look it up on the worker
            for worker in self.router.workers.values():
                if worker.pid == pid and token in worker.inflight:
                    req = worker.inflight[token]
        mem = None
        track = getattr(self.admission, "tracks", {}).get(token)
        if track is not None:
            mem = track.granted.get("mem_bytes")
        self.admission.record("enforce", now, {"rung": "oom", "child": name, "pid": pid, "token": token.hex()},
                              {"ok": True, "oom_kills": kills})
        if req is not None and not req.done:
            from kernel import errors

            spent = self.admission._spent(req, now) if hasattr(self.admission, "_spent") else None
            self.router.fail_request(req, errors.MemoryExceeded(
                f"request went past its memory ceiling (mem_bytes {mem:g}): the OS killed its worker"
                if mem is not None else "request went past its memory ceiling: the OS killed its worker",
                mem_bytes=mem), now, spent=spent)


class _TailBill:
    """Bills the CPU a single-slot worker burns on a request after the kernel answered it (its
    tombstone: from the answer until its own late FINAL, or the kill) to the request's job, as the
    OS measured it for the worker's group (a ledger ``charge`` of ``cpu_ms``; ``enforce`` record
    ``rung: bill``).  Multi-slot workers are not billed this way (their group's CPU is shared)."""

    def __init__(self, router: Any, procs: _Procs, admission: Any) -> None:
        self.router, self.procs, self.admission = router, procs, admission
        self.open: dict[bytes, tuple[str, str, float]] = {}  # token -> (child, job, cpu at the answer)
        self.done: set[bytes] = set()  # billed, still held (a killed worker not yet dropped)

    def step(self, held: list[Held], now: float) -> None:
        tokens = {h.token for h in held}
        self.done &= tokens
        for h in held:
            if h.token in self.open or h.token in self.done:
                continue
            worker = self.router.workers.get(h.worker)
            req = worker.inflight.get(h.token) if worker is not None else None
            name = self.procs.child_of_pid(h.pid)
            if req is None or req.job is None or name is None or worker.capacity != 1:
                self.done.add(h.token)
                continue
            cpu = self.procs.cpu_seconds(name)
            if cpu is None:
                self.done.add(h.token)
                continue
            self.open[h.token] = (name, req.job, cpu)
        for token in [t for t in self.open if t not in tokens]:  # its worker answered it
            self.bill(token, now)

    def bill(self, token: bytes, now: float) -> None:
        entry = self.open.pop(token, None)
        if entry is None:
            return
        self.done.add(token)
        name, job, before = entry
        after = self.procs.cpu_seconds(name)
        if after is None or after <= before:
            return
        cpu_ms = round((after - before) * 1000.0, 3)
        out = self.admission.decide("charge", now, job=job, spent={"cpu_ms": cpu_ms})
        self.admission.record("enforce", now, {"rung": "bill", "child": name, "token": token.hex(), "job": job},
                              {"ok": True, "cpu_ms": cpu_ms})
        for exhausted in out.get("exhausted", ()):
            self.router.apply(self.admission.exhaust(self.router, exhausted, now), now)


def _suppress_enforce() -> Any:
    import contextlib

    from kernel.enforce import EnforcerError

    return contextlib.suppress(LookupError, EnforcerError, OSError)


async def run(router: Any, procs: _Procs, ladder: Ladder, record: Any, stop: asyncio.Event, clock: Any = None,
              admission: Any = None) -> None:
    """Poll the router for tombstones every :data:`POLL_S` and apply the rungs due, until ``stop``;
    with ``admission``, per-request memory ceilings too (:class:`Ceilings`)."""
    import time

    clock = clock or time.monotonic
    ceilings = _CeilingShell(router, procs, admission) if admission is not None else None
    frozen: dict[int, str] = {}  # pid -> child, between its freeze and its kill
    bills = _TailBill(router, procs, admission) if admission is not None else None
    while not stop.is_set():
        try:
            held, live = tombstones(router, procs)
            now = clock()
            if bills is not None:
                bills.step(held, now)
            actions = ladder.observe(held, live, now)
            if actions:
                apply(actions, procs, record, now, frozen)
                if bills is not None:
                    for a in actions:
                        if a.rung == "kill":
                            bills.bill(a.token, now)
            if ceilings is not None:
                ceilings.step(now)
        except Exception:  # the ladder never takes the kernel down
            log.exception("internal error in the escalation ladder")
        await asyncio.sleep(POLL_S)
