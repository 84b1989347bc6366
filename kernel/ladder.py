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
3. still holding it ``kill_grace`` seconds after the freeze (default 1 s), or dropped by the
   liveness check meanwhile, it is **killed** (its whole group) and the supervisor restarts it
   (OTP: let it crash).  The kill never blocks: SIGKILL to every process of the group, then the
   group is thawed (on cgroup v1 a frozen task dies only once thawed).

Nothing frozen outlives the kernel: its shutdown thaws every group before it stops the services,
the enforcer thaws and kills its groups at exit (``atexit``), and a kernel killed outright
(SIGKILL) leaves groups that the next start thaws and kills (kernel/enforce.py).  A freeze never
blocks the kernel either: the shell writes it and waits at most :data:`FREEZE_WAIT_S` for the OS
to report it (the kill follows anyway).

A worker that answers (its FINAL frees the slot) before a rung is left alone; one frozen that
answers cannot (it is frozen), so every freeze ends in a kill.  Every rung is a decision-log record
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

__all__ = ["FREEZE_WAIT_S", "POLL_S", "Action", "Held", "Ladder", "run"]

#: How often the shell looks for tombstones, seconds (adds at most this to each rung).
POLL_S = 0.002
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


@dataclasses.dataclass(frozen=True)
class Action:
    rung: str  # "freeze" or "kill"
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


class Ladder:
    """Invariant: a token is tracked from its first sighting as a tombstone until its worker
    answers it (gone while the worker is still registered) or it was killed."""

    def __init__(self, freeze_grace: float = 0.020, kill_grace: float = 1.0) -> None:
        if freeze_grace < 0 or kill_grace < 0:
            raise ValueError("graces must be >= 0")
        self.freeze_grace = freeze_grace
        self.kill_grace = kill_grace
        self.tracks: dict[bytes, _Track] = {}
        self.counts = {"frozen": 0, "killed": 0, "answered": 0}

    def observe(self, held: Iterable[Held], live_workers: set[bytes], now: float) -> list[Action]:
        """The rungs due at ``now``, given the tombstones now held and the registered workers."""
        seen = set()
        for h in held:
            seen.add(h.token)
            if h.token not in self.tracks:
                self.tracks[h.token] = _Track(h.pid, h.worker, now, max(self.freeze_grace, h.grace))
        out: list[Action] = []
        frozen_pids: set[int] = set()
        for token, t in list(self.tracks.items()):
            if token not in seen and t.worker in live_workers and t.frozen is None:
                del self.tracks[token]  # its worker answered it
                self.counts["answered"] += 1
                continue
            if t.frozen is None:
                if now - t.seen >= t.grace:
                    t.frozen = now
                    if t.pid not in frozen_pids:
                        out.append(Action("freeze", t.pid, token, now - t.seen))
                        frozen_pids.add(t.pid)
                        self.counts["frozen"] += 1
            elif now - t.frozen >= self.kill_grace or t.worker not in live_workers:
                del self.tracks[token]
                if not any(a.rung == "kill" and a.pid == t.pid for a in out):
                    out.append(Action("kill", t.pid, token, now - t.seen))
                    self.counts["killed"] += 1
        return out

    def next_due(self) -> float | None:
        """When the next rung falls due (None: nothing tracked)."""
        times = [
            t.seen + t.grace if t.frozen is None else t.frozen + self.kill_grace for t in self.tracks.values()
        ]
        return min(times) if times else None


class _Procs(Protocol):
    def child_of_pid(self, pid: int) -> str | None: ...
    def grace_of(self, name: str) -> float: ...
    def freeze(self, name: str, timeout: float = ...) -> float: ...
    def kill_group(self, name: str) -> int: ...
    def cpu_seconds(self, name: str) -> float | None: ...


def tombstones(router: Any, procs: _Procs | None = None) -> tuple[list[Held], set[bytes]]:
    """The router's answered-but-held requests (with their services' declared graces, from
    ``procs``) and its registered workers (read only)."""
    held = []
    for identity, worker in router.workers.items():
        if worker.pid is None:
            continue
        grace = None
        for token, req in worker.inflight.items():
            if req.done:
                if grace is None:
                    name = procs.child_of_pid(worker.pid) if procs is not None else None
                    grace = procs.grace_of(name) if procs is not None and name is not None else 0.0
                held.append(Held(token, worker.pid, identity, grace))
    return held, set(router.workers)


def apply(actions: list[Action], procs: _Procs, record: Any, now: float) -> None:
    """Carry out the rungs through the supervisor; each is recorded (``record(op, now, in, out)``)."""
    for a in actions:
        name = procs.child_of_pid(a.pid)
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
                try:
                    out: dict[str, Any] = {"ok": True, "landed": True,
                                           "freeze_s": procs.freeze(name, FREEZE_WAIT_S)}
                except FreezeTimeout:  # written; the OS stops the group when it gets to it
                    out = {"ok": False, "landed": False, "why": f"not reported frozen within {FREEZE_WAIT_S:g} s"}
            else:
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


async def run(router: Any, procs: _Procs, ladder: Ladder, record: Any, stop: asyncio.Event, clock: Any = None) -> None:
    """Poll the router for tombstones every :data:`POLL_S` and apply the rungs due, until ``stop``."""
    import time

    clock = clock or time.monotonic
    while not stop.is_set():
        try:
            held, live = tombstones(router, procs)
            now = clock()
            actions = ladder.observe(held, live, now)
            if actions:
                apply(actions, procs, record, now)
        except Exception:  # the ladder never takes the kernel down
            log.exception("internal error in the escalation ladder")
        await asyncio.sleep(POLL_S)
