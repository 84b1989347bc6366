"""The escalation ladder: a worker is never trusted to stop.

When the kernel answers a request it has already dispatched -- its budget ran out, its deadline
passed, its owner or an operator cancelled it -- the router publishes the cooperative ``cancel``
and keeps the request in its worker's slot as a *tombstone* until the worker's own late FINAL
(kernel/router.py, ``fail_request``).  The ladder watches those tombstones, and the CPU the OS
measures for each worker's group (kernel/enforce.py ``cpu_seconds``) while they are held.

Rungs
-----
1. the cooperative order is out (the router sent it); the worker should answer at its next safe
   point;
2. a worker still holding the request ``freeze_grace`` seconds later (default 10 ms) **and
   burning CPU on it** -- its group burnt at least :data:`BURN_MIN_S` since the answer, and at
   least the grace its service declared (``[[service]] grace_ms``, CPU time: scch answers when its
   bounded solver call returns, decode when its bounded beam does) -- is **frozen**
   (kernel/enforce.py: the cgroup freezer stops its whole process tree atomically; on the signals
   backend, SIGSTOP): it burns nothing more.  A worker that holds the request but burns nothing
   (it waits) is not frozen: there is nothing to stop;
3. ``kill_grace`` seconds after the freeze (default 1 s) it is **thawed** for ``answer_grace``
   (:data:`ANSWER_GRACE_S`, 100 ms) to answer the cancel it already holds -- a cooperative worker
   that was merely slow on a busy machine answers at its next safe point and lives.  A worker on
   another node (Ray placement) is thawed by its node agent through a Ray actor call and answers
   over the network: its window is its own (``Held.answer_grace``: ``[enforce]
   remote_answer_grace_ms`` plus twice the longest round trip to its agent measured lately,
   kernel/supervisor.py ``answer_grace_of``), fixed when the tombstone is first seen, never
   below the ladder's ``answer_grace`` nor above ``answer_cap`` (:data:`ANSWER_CAP_S`);
4. still holding it then, an *exclusive* worker is **killed** (its whole group) and the
   supervisor restarts it (OTP: let it crash).  An exclusive worker that holds the request
   without burning is killed at the same point, ``max(freeze_grace, grace) + kill_grace +
   answer_grace`` after the answer (its slot comes back).  The kill never blocks: SIGKILL to every
   process of the group, then the group is thawed (on cgroup v1 a frozen task dies only once
   thawed).

Hung workers
------------
A worker that sends nothing for its liveness window while it holds requests is dropped by the
router, which answers them ``worker_died`` (kernel/router.py); a worker that keeps computing
without a safe point -- a step that never yields, a handler that blocks its loop -- is one.  Its
process would go on burning CPU that no request is billed for any more, and would take no order
(it reads none).  The router lists it in ``Router.hung``; the ladder kills its whole group at its
next poll and the supervisor restarts it (:func:`kill_hung`).

Shared workers: who else a kill would hurt
------------------------------------------
A worker is *spared* when a kill would take more than the offending request with it:

* it serves another principal's live (unanswered) requests besides the tombstone
  (``Held.shared``): it is never frozen while it does (a freeze would stop them too).  The
  tombstone's own principal's live requests do not spare it: what a freeze or a kill takes from
  them is that principal's own loss, and a client could otherwise park a request of its own
  beside one that ignores its cancel;
* or its service keeps state between requests -- decode's sessions, which other principals may
  hold -- (``Held.keeps``; declared: :data:`kernel.supervisor.KEEPS_STATE`, ``[[service]]
  keeps_state``).  The kernel cannot see whose state a worker keeps, so it counts any as another
  principal's.

A spared worker is not killed at the end of its answer window.  Instead it is throttled: frozen
again (if it burnt during the window and serves nothing live) for ``kill_grace``, thawed for
``answer_grace``, and so on, until it answers -- a long step with no safe point (a beam) runs to
its end at about ``answer_grace / (kill_grace + answer_grace)`` of a CPU, and the state survives.
It is killed only past a hard ceiling: the tombstone burnt ``cpu_ceiling`` seconds of CPU since
its answer (default 5 s, at least twice its declared grace), or was held ``hold_ceiling`` seconds
(default 30 s, the backstop for a tombstone that waits for ever on a slot).  Then the other
principals' live requests on it are answered ``worker_died`` (the router, when the worker drops)
and their kept sessions answer ``session_lost`` at their next use (the restarted worker's
incarnation is in every session id it hands out: services/decode) -- never a silent loss.

Billing
-------
The CPU a worker's group burns while it holds tombstones is attributed to them: each poll's
growth of the group's CPU is split evenly over the requests in its slots (tombstones and live
ones; on a worker holding only tombstones, all of it goes to them).  What a tombstone burnt is
billed to its request's job (a ledger ``charge`` of ``cpu_ms``, ``enforce`` record ``rung:
bill``) every :data:`BILL_EVERY_S` of CPU and when it ends (answered, killed, its worker gone).

Invariants
----------
* A token is tracked from its first sighting as a tombstone until its worker answers it (gone
  while the worker is still registered), it was killed, or its worker is gone.  A killed
  worker's tombstones are not tracked again while the router still lists it (until its liveness
  runs out).
* Every tracked token of one process is in the same rung (``run``, ``frozen``, ``thawed``): the
  process is the unit a freeze, thaw and kill act on; one action of each rung per process.
* A worker serving a live request is never frozen; a spared worker is killed only past a
  ceiling.  What a tombstone burns past its answer is bounded: by its rungs on an exclusive worker
  (about ``grace + answer_grace`` of CPU), by ``cpu_ceiling`` (its attributed share; the group's
  CPU by ``slots * cpu_ceiling``) and ``hold_ceiling`` on a spared one; all of it is billed.
* A worker without a CPU reading (``cpu`` None, or its pid not in it) is judged by wall time
  alone, as the ladder was first built: its tombstone counts as burning, and its first freeze
  waits the declared grace in wall time.

Nothing frozen outlives the kernel: its shutdown thaws every group before it stops the services,
the enforcer thaws and kills its groups at exit (``atexit``), and a kernel killed outright
(SIGKILL) leaves groups that the next start thaws and kills (kernel/enforce.py).  A freeze never
blocks the kernel either: the shell writes it and waits at most :data:`FREEZE_WAIT_S` for the OS
to report it (the kill follows anyway).

A worker that answers (its FINAL frees the slot) before a rung is left alone; a frozen one cannot
answer until it is thawed -- but an answer sent just before the freeze landed arrives afterwards,
and a process whose last held request is answered while it is frozen is thawed (``answered``).  Every rung is a decision-log record (``enforce``: the rung, why, the
child, its pid, the request's token, and the CPU seconds the OS measured for the child's group at
that moment), so what a request burnt after its cancel is on record.

:class:`Ladder` is the pure part (tombstones and CPU readings in, actions out, ``now`` passed
in); :func:`run` is the kernel's shell, a task polling the router every :data:`POLL_S` seconds
while there is something to watch (the router is only read).

Sleeping while there is nothing to watch
----------------------------------------
An idle kernel's ladder polled 500 times a second for nothing: 3-4 % of a core (docs/limits.md).
With a :class:`Wake` (the kernel's), the shell sleeps after a poll that leaves it nothing to watch
and the core wakes it where such work is born (``Router.ladder_wake``):

* a *tombstone*: ``Router.fail_request`` keeps an answered request in its worker's slot;
* a *hung* worker: ``Router._sweep`` lists one in ``Router.hung``;
* a *memory grant*: ``BudgetAdmission.admit`` grants a request ``mem_bytes`` (a ceiling to set
  once it holds a single-slot worker: :class:`Ceilings`).  At the grant, not at dispatch: a plain
  MDP request gets its job's ``mem_bytes`` without a forwarded header, and a paused request's
  single slot comes back to it when the request its slot was lent to ends -- neither passes a
  dispatch hook;
* a *departure*: ``Router._worker_gone`` -- not work, but the ladder forgets a worker it killed
  (:attr:`Ladder.killed`) only when it polls, and a worker registering again under the same
  routing id must be watched again.

Nothing to watch (:func:`pending` is None, and the shell holds nothing): no tombstone on a worker
with a pid, no hung worker listed, no admission track with a ``mem_bytes`` grant (with
``admission``), no tracked or ended tombstone, no unbilled job, no memory ceiling set or OOM
watched, and no preempt boost (``RECA_PREEMPT_BOOST=1`` keeps it polling: its work is born at a
preempt).  ``frozen`` does not count: with nothing tracked, an entry left in it is a group the
ladder thawed already (an answer that crossed the freeze), and it matters only to a later kill.

Invariants: every rung is still applied within :data:`POLL_S` of being due -- work is born only
at a hook, the hook sets the event, and the shell polls every :data:`POLL_S` while any work is
left; no wake-up is lost -- the shell clears the event, checks, and awaits it with no ``await``
in between, and the check reads the state (a birth during the poll itself is seen, not its
event); the ladder asleep with no wake-up pending means :func:`pending` is None
(:meth:`Wake.check_invariants`, run by ``Router.check_invariants``).  Without a wake (a router
the shell was not given one for) it polls as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from kernel.enforce import FreezeTimeout

log = logging.getLogger("reca.ladder")

__all__ = ["ANSWER_CAP_S", "ANSWER_GRACE_S", "BILL_EVERY_S", "BURN_CPU_MIN_S", "BURN_MIN_S", "CPU_CEILING_S", "DEMAND_MIN", "FREEZE_WAIT_S", "HOLD_CEILING_S",
           "POLL_S", "Action", "Ceilings", "Held", "Ladder", "Wake", "kill_hung", "pending", "run",
           "single_slot_grants"]

#: How often the shell looks for tombstones, seconds (adds at most this to each rung).
POLL_S = 0.002
#: After ``kill_grace`` frozen, the worker is thawed and has this long to answer its cancel before
#: the kill (seconds): a cooperative worker that was only slow on a busy machine is not killed.
ANSWER_GRACE_S = 0.1
#: How much longer than its configured grace an answer window after a thaw can be, seconds (the
#: kernel's ladder caps windows at ``[enforce] remote_answer_grace_ms`` plus this; a ladder built
#: without a cap, at this; the floor is the ladder's ``answer_grace``): a remote worker's window
#: is that grace plus twice its agent's longest recent round trip, and one slow round trip (an
#: agent call that timed out counts its 10 s) must not keep a burning worker alive that long.
ANSWER_CAP_S = 2.0
#: Longest the shell waits for a freeze to be reported, seconds (the kernel's loop is blocked
#: meanwhile); one not reported by then is recorded ``landed: false`` and lands on its own.
FREEZE_WAIT_S = 0.005
#: CPU a tombstone must have burnt (seconds) to count as burning: an idle worker's heartbeat and
#: event loop spend far less in a grace (an idle echo worker, measured: 0.04 ms per 20 ms), and a
#: cooperative worker with safe points less than this much CPU apart answers before it is frozen.
BURN_MIN_S = 0.002
#: ... of which at least this much must be CPU it got (seconds): the rest may be time it waited
#: runnable for a CPU (kernel/enforce.py ``cpu_waited``).  A worker starved by a busy machine
#: burns little but wants much -- judged by CPU alone its freeze came 30-120 ms past its budget
#: with 1-3 ms burnt (issue 23, load 6-30); an idle worker's heartbeat that waits long on a busy
#: runqueue burns far less than this (0.04 ms per 20 ms), so it does not count as burning.
BURN_CPU_MIN_S = 0.0005
#: ... and CPU got plus time waited runnable must fill at least this share of the rung's wall
#: time: a starved spinner is running or runnable nearly all the time (share ~1), an idle worker
#: whose heartbeats wait long on a busy runqueue only now and then -- over a second its few
#: wake-ups add up to the 2 ms of ``burn_min``, which alone froze idle workers at load 16-20.
DEMAND_MIN = 0.5
#: A spared worker's tombstone is killed past this much CPU since its answer (seconds; at least
#: twice the grace its service declared).
CPU_CEILING_S = 5.0
#: ... or past this long held (seconds): the backstop for a tombstone that burns nothing but keeps
#: a slot.
HOLD_CEILING_S = 30.0
#: ``RECA_PREEMPT_BOOST=1`` in the kernel's environment turns the preempt boost on.  Off by
#: default: measured on a near-quiet machine with two burners (1,000 cycles, three interleaved
#: pairs, 2026-12-07), the boost made preempt -> paused slower, p99 10.1 / 9.9 / 10.4 ms against
#: 5.0 / 7.8 / 7.4 ms without (p50 1.0-1.2 against 0.7-0.85): it raises the worker's group and the
#: subtree's root above the kernel's own weight, and the kernel must run to relay the pause.
ENV_PREEMPT_BOOST = "RECA_PREEMPT_BOOST"
#: A tombstone's CPU is billed whenever this much (seconds) accrued unbilled, and at its end.
BILL_EVERY_S = 0.05


@dataclasses.dataclass(frozen=True)
class Held:
    """A tombstone: request ``token`` answered but still in the slot of the worker with ``pid``."""

    token: bytes
    pid: int
    worker: bytes  # the worker's routing id
    grace: float = 0.0  # the grace its service declared, CPU seconds
    #: The worker also serves live (unanswered) requests: freezing or killing it would stop them too.
    shared: bool = False
    #: Its service keeps state between requests (sessions other principals may hold): a kill loses it.
    keeps: bool = False
    #: Requests in the worker's slots (live and tombstones): its group's CPU is split over them.
    slots: int = 1
    #: The worker's answer window after a thaw, seconds (None: the ladder's ``answer_grace``): a
    #: worker placed on another node is thawed through its node agent and answers over the network
    #: (kernel/supervisor.py ``answer_grace_of``).
    answer_grace: float | None = None


@dataclasses.dataclass(frozen=True)
class Action:
    rung: str  # "freeze", "thaw" or "kill"
    pid: int
    token: bytes
    held_s: float  # since the tombstone was first seen
    why: str = ""  # "burning", "answer window", "idle", "cpu ceiling", "hold ceiling", "worker gone"
    burnt_s: float = 0.0  # CPU the tombstone burnt since its answer (attributed), seconds


@dataclasses.dataclass
class _Track:
    pid: int
    worker: bytes
    seen: float
    grace: float = 0.0
    keeps: bool = False
    shared: bool = False
    rung: str = "run"  # "run", "frozen" or "thawed"
    since: float = 0.0  # when the current rung began
    burnt: float = 0.0  # CPU seconds attributed to it since it was first seen
    mark: float = 0.0  # ``burnt`` when the current rung began
    cycles: int = 0  # freezes so far
    waited: float = 0.0  # seconds its process waited runnable for a CPU since it was first seen
    wmark: float = 0.0  # ``waited`` when the current rung began
    billed: float = 0.0  # of ``burnt``, what was billed
    answer: float | None = None  # its answer window (None: the ladder's)

    @property
    def spared(self) -> bool:
        return self.shared or self.keeps


class Ladder:
    """The ladder's state machine (see the module docstring for the rungs and invariants).

    ``observe(held, live_workers, now, cpu)``: ``cpu`` maps a worker pid to its group's CPU seconds
    as the OS measured them now (None: no readings, the wall-time trigger).  Ended tracks (answered,
    killed, worker gone) are left in :attr:`ended` as (token, CPU seconds burnt, billed) for the
    shell to bill and clear."""

    def __init__(self, freeze_grace: float = 0.010, kill_grace: float = 1.0, answer_grace: float = ANSWER_GRACE_S,
                 *, cpu_ceiling: float = CPU_CEILING_S, hold_ceiling: float = HOLD_CEILING_S,
                 burn_min: float = BURN_MIN_S, answer_cap: float = ANSWER_CAP_S) -> None:
        if min(freeze_grace, kill_grace, answer_grace, burn_min) < 0 or cpu_ceiling <= 0 or hold_ceiling <= 0:
            raise ValueError("graces must be >= 0 and ceilings > 0")
        self.freeze_grace = freeze_grace
        self.kill_grace = kill_grace
        self.answer_grace = answer_grace
        #: A tombstone's own answer window is clamped to [answer_grace, answer_cap] (see _window).
        self.answer_cap = max(answer_cap, answer_grace)
        self.cpu_ceiling = cpu_ceiling
        self.hold_ceiling = hold_ceiling
        self.burn_min = burn_min
        self.tracks: dict[bytes, _Track] = {}
        self.cpu_last: dict[int, float] = {}  # pid -> its group's CPU at the last reading
        self.wait_last: dict[int, float] = {}  # pid -> its group's runqueue wait at the last reading
        self.ended: list[tuple[bytes, float, float]] = []
        #: Workers killed, until the router drops them: their tombstones are not tracked again.
        self.killed: set[bytes] = set()
        self.counts = {"frozen": 0, "thawed": 0, "killed": 0, "answered": 0}

    def ceiling_of(self, t: _Track) -> float:
        return max(self.cpu_ceiling, 2.0 * t.grace)

    def _attribute(self, held: list[Held], cpu: Mapping[int, float]) -> None:
        slots: dict[int, int] = {}
        for h in held:
            slots[h.pid] = max(slots.get(h.pid, 1), h.slots)
        by_pid: dict[int, list[_Track]] = {}
        for t in self.tracks.values():
            by_pid.setdefault(t.pid, []).append(t)
        for pid, reading in cpu.items():
            last = self.cpu_last.get(pid)
            self.cpu_last[pid] = reading
            if last is None or reading <= last or pid not in by_pid:
                continue
            share = (reading - last) / max(slots.get(pid, 1), len(by_pid[pid]))
            for t in by_pid[pid]:
                t.burnt += share
        for pid in [p for p in self.cpu_last if p not in by_pid and p not in cpu]:
            del self.cpu_last[pid]

    def _waits(self, waited: Mapping[int, float]) -> None:
        """Growth of each process's runqueue wait since the last reading, added to its tracks
        (not split: it says the process wants a CPU, not whose the CPU is).  A drop (a task
        exited and took its count) adds nothing."""
        pids = {t.pid for t in self.tracks.values()}
        for pid, reading in waited.items():
            last = self.wait_last.get(pid)
            self.wait_last[pid] = reading
            if last is None or reading <= last or pid not in pids:
                continue
            for t in self.tracks.values():
                if t.pid == pid:
                    t.waited += reading - last
        for pid in [p for p in self.wait_last if p not in pids and p not in waited]:
            del self.wait_last[pid]

    def _burning(self, t: _Track, cpu_known: bool, now: float) -> bool:
        """Whether the track's process burnt since its rung began: its declared grace in CPU
        (first freeze), else ``burn_min`` of CPU it got or waited runnable for, at least
        ``BURN_CPU_MIN_S`` of it got, the two together at least ``DEMAND_MIN`` of the time."""
        if not cpu_known:
            return True
        burnt = t.burnt - t.mark
        if not t.cycles and t.grace > self.burn_min:
            return burnt >= t.grace  # a declared grace is CPU the service may spend
        if burnt >= self.burn_min:
            return True
        wanted = burnt + t.waited - t.wmark
        return (burnt >= min(BURN_CPU_MIN_S, self.burn_min) and wanted >= self.burn_min
                and wanted >= DEMAND_MIN * (now - t.since))

    def observe(self, held: Iterable[Held], live_workers: set[bytes], now: float,
                cpu: Mapping[int, float] | None = None, waited: Mapping[int, float] | None = None) -> list[Action]:
        """The rungs due at ``now``, given the tombstones now held, the registered workers and
        (optionally) each holding worker's group CPU and the seconds its tasks waited runnable
        for a CPU (kernel/enforce.py ``cpu_waited``)."""
        self.killed &= live_workers
        held = [h for h in held if h.worker not in self.killed]
        if cpu is not None:  # before new tombstones join: what a process burnt before one was answered is not its
            self._attribute(held, cpu)
        if waited is not None:
            self._waits(waited)
        seen: dict[bytes, Held] = {}
        for h in held:
            seen[h.token] = h
            t = self.tracks.get(h.token)
            if t is None:
                t = self.tracks[h.token] = _Track(h.pid, h.worker, now, h.grace, h.keeps, h.shared, since=now,
                                                  answer=self._window(h.answer_grace))
                peer = next((p for p in self.tracks.values() if p.pid == h.pid and p is not t), None)
                if peer is not None and peer.rung != "run":  # the process is frozen or thawed already
                    t.rung, t.since = peer.rung, peer.since
            t.shared, t.keeps = h.shared, h.keeps  # its answer window stays the one it was first given
        out: list[Action] = []
        done: set[tuple[str, int]] = set()  # one action of each rung per process

        def act(rung: str, t: _Track, token: bytes, why: str) -> None:
            if (rung, t.pid) in done:
                return
            done.add((rung, t.pid))
            out.append(Action(rung, t.pid, token, now - t.seen, why, t.burnt))
            self.counts[{"freeze": "frozen", "thaw": "thawed", "kill": "killed"}[rung]] += 1
            if rung == "kill":
                self.killed.add(t.worker)
            for tok, other in list(self.tracks.items()):  # the process is the unit
                if other.pid != t.pid:
                    continue
                if rung == "kill":
                    self._end(tok)
                else:
                    other.rung, other.since, other.mark = ("frozen" if rung == "freeze" else "thawed"), now, other.burnt
                    other.wmark = other.waited
                    if rung == "freeze":
                        other.cycles += 1

        for token, t in list(self.tracks.items()):
            if token not in self.tracks:  # ended by an action on its process this round
                continue
            live = t.worker in live_workers
            known = cpu is not None and t.pid in cpu
            if token not in seen:
                if live:
                    if t.rung == "frozen" and not any(o.pid == t.pid for k, o in self.tracks.items() if k != token):
                        # its answer crossed the freeze (sent before the group stopped): no other
                        # request of this process is held, so nothing else would ever thaw it
                        act("thaw", t, token, "answered")
                    self._end(token)  # its worker answered it
                    self.counts["answered"] += 1
                elif t.rung == "run":
                    self._end(token)  # its worker is gone (died, dropped): nothing left to stop
                else:
                    act("kill", t, token, "worker gone")  # frozen or thawed: its group is killed and thawed
                continue
            if t.burnt >= self.ceiling_of(t):
                act("kill", t, token, "cpu ceiling")
            elif now - t.seen >= max(self.hold_ceiling, 2.0 * t.grace):
                act("kill", t, token, "hold ceiling")
            elif t.rung == "run":
                if not t.shared and now - t.since >= self._wall_grace(t, known) and self._burning(t, known, now):
                    act("freeze", t, token, "burning")
                elif not t.spared and now - t.seen >= self._idle_kill(t):
                    act("kill", t, token, "idle")
            elif t.rung == "frozen":
                if now - t.since >= self.kill_grace:
                    act("thaw", t, token, "answer window")
            elif now - t.since >= self._answer(t):  # thawed, its answer window over
                if not t.spared:
                    act("kill", t, token, "answer window")
                elif not t.shared and self._burning(t, known, now):
                    act("freeze", t, token, "burning")  # throttled: frozen again, the state survives
                else:
                    t.rung, t.since, t.mark, t.wmark = "run", now, t.burnt, t.waited
        return out

    def _wall_grace(self, t: _Track, cpu_known: bool = False) -> float:
        """Wall time from the rung's start before a freeze: the ladder's grace; without CPU
        readings, the first freeze also waits the service's declared grace in wall time."""
        return self.freeze_grace if cpu_known or t.cycles else max(self.freeze_grace, t.grace)

    def _idle_kill(self, t: _Track) -> float:
        """An exclusive worker holding a tombstone without burning is killed this long after the
        answer: when a burning one would be (its slot comes back)."""
        return max(self.freeze_grace, t.grace) + self.kill_grace + self._answer(t)

    def _window(self, offered: float | None) -> float | None:
        """A new tombstone's answer window from the one its worker offers (None: the ladder's),
        clamped to [answer_grace, answer_cap] -- computed once: a round trip measured later (a
        slow one) does not move a window already running."""
        if offered is None:
            return None
        return min(max(offered, self.answer_grace), self.answer_cap)

    def _answer(self, t: _Track) -> float:
        """The track's answer window after a thaw: its worker's (a remote one's is longer), else
        the ladder's."""
        return self.answer_grace if t.answer is None else t.answer

    def _end(self, token: bytes) -> None:
        t = self.tracks.pop(token)
        self.ended.append((token, t.burnt, t.billed))

    def next_due(self) -> float | None:
        """When the next wall-time rung falls due (None: nothing tracked); the CPU trigger is
        polled."""
        times = [
            t.since + self._wall_grace(t) if t.rung == "run" and t.spared
            else min(t.since + self._wall_grace(t), t.seen + self._idle_kill(t)) if t.rung == "run"
            else t.since + self.kill_grace if t.rung == "frozen"
            else t.since + self._answer(t)
            for t in self.tracks.values()
        ]
        return min(times) if times else None

    def unbilled(self, every: float = BILL_EVERY_S) -> list[tuple[bytes, float]]:
        """Tracks with at least ``every`` CPU seconds burnt and not yet billed: (token, seconds),
        marked billed."""
        out = []
        for token, t in self.tracks.items():
            if t.burnt - t.billed >= every:
                out.append((token, t.burnt - t.billed))
                t.billed = t.burnt
        return out


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
    def owns_pid(self, name: str, pid: int) -> bool: ...
    def grace_of(self, name: str) -> float: ...
    def keeps_of(self, name: str) -> bool: ...
    def answer_grace_of(self, name: str) -> float | None: ...
    def boost(self, name: str, why: str = ...) -> None: ...
    def unboost(self, name: str, why: str = ...) -> None: ...
    def freeze(self, name: str, timeout: float = ...) -> float: ...
    def thaw(self, name: str) -> None: ...
    def kill_group(self, name: str) -> int: ...
    def cpu_seconds(self, name: str) -> float | None: ...
    def memory_ceiling(self, name: str, headroom: int | None) -> int | None: ...
    def oom_kills(self, name: str) -> int | None: ...


def tombstones(router: Any, procs: _Procs | None = None) -> tuple[list[Held], set[bytes]]:
    """The router's answered-but-held requests (with their services' declared graces and whether
    they keep state, from ``procs``) and its registered workers (read only)."""
    held = []
    for identity, worker in router.workers.items():
        if worker.pid is None:
            continue
        declared: tuple[float, bool, float | None] | None = None
        # Whose live (unanswered) requests the worker serves: a kill or a freeze would take them
        # with the tombstone.  Only another principal's spare it -- a principal's own live request
        # beside its tombstone does not (issue 23: a client parked a sleeping request of its own on
        # a two-slot worker, and its spinning tombstone was never frozen).
        live_of: set[tuple[str, bytes]] | None = None  # (built only for a worker holding a tombstone)
        for token, req in worker.inflight.items():
            if req.done:
                if live_of is None:
                    live_of = {_owner(r) for r in worker.inflight.values() if not r.done}
                shared = bool(live_of - {_owner(req)})
                if declared is None:
                    name = procs.child_of_pid(worker.pid) if procs is not None else None
                    declared = (procs.grace_of(name), bool(getattr(procs, "keeps_of", lambda n: False)(name)),
                                getattr(procs, "answer_grace_of", lambda n: None)(name)) \
                        if procs is not None and name is not None else (0.0, False, None)
                held.append(Held(token, worker.pid, identity, declared[0], shared, declared[1], len(worker.inflight),
                                 declared[2]))
    return held, set(router.workers)


def _owner(req: Any) -> tuple[str, bytes]:
    """Whose a request is, for sparing: the principal a service acts for (header ``for``), else
    the sender's; an operator's (every ``ipc://`` peer is the one local operator) also by its
    connection, so two local clients spare each other."""
    principal = req.principal
    name = req.acting_for or principal.name
    return (name, req.client if principal.operator and req.acting_for is None else b"")


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
            record("enforce", now, {"rung": a.rung, "why": a.why, "child": gone, "pid": a.pid, "token": a.token.hex()},
                   out_gone)
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
            "ladder: %s %s (pid %d, %s): request %s held %.1f ms past its answer, burnt %.1f ms CPU",
            a.rung,
            name,
            a.pid,
            a.why,
            a.token.hex(),
            a.held_s * 1e3,
            a.burnt_s * 1e3,
        )
        record(
            "enforce",
            now,
            {"rung": a.rung, "why": a.why, "child": name, "pid": a.pid, "token": a.token.hex(),
             "held_ms": round(a.held_s * 1e3, 3), "burnt_ms": round(a.burnt_s * 1e3, 3)},
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


class _PreemptBoost:
    """Boosts the group of a worker the kernel asked to pause a request (a preempt sent, its
    ``paused`` not yet back: the admission track is ``preempted`` and not ``paused``) until it
    pauses, the request ends, or the worker goes: the worker runs at once on a busy machine and
    reaches its safe point sooner (kernel/enforce.py ``Group.boost``; ``bench preempt``)."""

    def __init__(self, router: Any, procs: _Procs, admission: Any) -> None:
        self.router, self.procs, self.admission = router, procs, admission
        self.boosted: set[str] = set()  # children boosted now

    def step(self) -> None:
        tracks = getattr(self.admission, "tracks", {})
        want: set[str] = set()
        for worker in self.router.workers.values():
            if worker.pid is None:
                continue
            for token, req in worker.inflight.items():
                track = tracks.get(token)
                if not req.done and track is not None and track.preempted and not track.paused:
                    name = self.procs.child_of_pid(worker.pid)
                    if name is not None:
                        want.add(name)
                    break
        for name in want - self.boosted:
            with _suppress_enforce():
                self.procs.boost(name)
        for name in self.boosted - want:
            with _suppress_enforce():
                self.procs.unboost(name)
        self.boosted = want


class _Bills:
    """Bills the CPU a worker burns on a request after the kernel answered it (its tombstone: from
    the answer until its own late FINAL, the kill, or its worker's end), as the ladder attributed
    it from the OS's measure of the worker's group, to the request's job: a ledger ``charge`` of
    ``cpu_ms`` and an ``enforce`` record ``rung: bill``, every :data:`BILL_EVERY_S` of CPU and at
    the end."""

    def __init__(self, router: Any, admission: Any) -> None:
        self.router, self.admission = router, admission
        self.jobs: dict[bytes, tuple[str, str]] = {}  # token -> (job, child)

    def note(self, held: list[Held], procs: _Procs) -> None:
        for h in held:
            if h.token in self.jobs:
                continue
            worker = self.router.workers.get(h.worker)
            req = worker.inflight.get(h.token) if worker is not None else None
            self.jobs[h.token] = (getattr(req, "job", None) or "", procs.child_of_pid(h.pid) or "")

    def step(self, ladder: Ladder, now: float) -> None:
        for token, cpu_s in ladder.unbilled():
            self.bill(token, cpu_s, now)
        ended, ladder.ended = ladder.ended, []
        for token, burnt, billed in ended:
            if burnt > billed:
                self.bill(token, burnt - billed, now)
            self.jobs.pop(token, None)

    def bill(self, token: bytes, cpu_s: float, now: float) -> None:
        job, name = self.jobs.get(token, ("", ""))
        cpu_ms = round(cpu_s * 1000.0, 3)
        if not job or cpu_ms <= 0:
            return
        out = self.admission.decide("charge", now, job=job, spent={"cpu_ms": cpu_ms})
        self.admission.record("enforce", now, {"rung": "bill", "child": name, "token": token.hex(), "job": job},
                              {"ok": True, "cpu_ms": cpu_ms})
        for exhausted in out.get("exhausted", ()):
            self.router.apply(self.admission.exhaust(self.router, exhausted, now), now)


def kill_hung(hung: Any, procs: _Procs, record: Any, now: float, frozen: dict[int, str] | None = None) -> None:
    """Kill the process of every worker the router dropped as *hung* (``router.hung``: silent for
    its liveness window while it held requests, which were answered ``worker_died``), taking them
    oldest first.  A worker that cannot send a heartbeat for that long cannot take an order either,
    and may be burning CPU that no request is billed for any more: its whole group is killed and
    the supervisor restarts it (OTP: let it crash).  Each is one ``enforce`` decision, why
    ``hung``: rung ``kill``, or rung ``spare`` (not killed) for

    * a worker whose service keeps state between requests (``keeps_state``: decode's sessions,
      sim's, kvtp's and ttc's runs): a kill would take every principal's state with it, which the
      ladder otherwise risks only past its ceilings -- it is dropped, as before, and re-registers
      with its state when its step ends;
    * a child an operator stopped (``mmi.proc.stop``; not one the ladder froze): the stop is a
      pause, and its silence is the operator's doing.

    The child is the one the worker's principal names (``child:NAME``, whose pid the supervisor
    confirmed at READY and still owns), else the local child running that pid; one that is
    neither (it exited, it is another peer's process) is only recorded."""
    frozen = {} if frozen is None else frozen
    while hung:
        h = hung.popleft()
        if h.child is not None:
            name = h.child if procs.owns_pid(h.child, h.pid) else None
        else:
            name = procs.child_of_pid(h.pid)
        inputs = {"rung": "kill", "why": "hung", "child": name, "pid": h.pid, "service": h.service,
                  "tokens": [t.hex() for t in h.tokens[:8]], "silent_since": round(now - h.at, 3)}
        if name is None:
            record("enforce", now, inputs, {"ok": False, "why": "not a running supervised child"})
            continue
        spare = ("its service keeps state" if getattr(procs, "keeps_of", lambda n: False)(name)
                 else "stopped by an operator" if h.pid not in frozen
                 and getattr(procs, "stopped", lambda n: False)(name) else None)
        if spare is not None:
            inputs["rung"] = "spare"
            log.warning("ladder: %s (pid %d) missed its liveness window holding %d request(s); not killed: %s",
                        name, h.pid, len(h.tokens), spare)
            record("enforce", now, inputs, {"ok": True, "why": spare})
            continue
        frozen.pop(h.pid, None)
        try:
            out: dict[str, Any] = {"ok": True, "killed": procs.kill_group(name)}
        except (LookupError, OSError, RuntimeError) as exc:
            out = {"ok": False, "why": str(exc)}
        out["cpu_s"] = procs.cpu_seconds(name)
        log.warning("ladder: kill %s (pid %d): it missed its liveness window holding %d request(s)",
                    name, h.pid, len(h.tokens))
        record("enforce", now, inputs, out)


def _suppress_enforce() -> Any:
    import contextlib

    from kernel.enforce import EnforcerError

    return contextlib.suppress(LookupError, EnforcerError, OSError)


def pending(router: Any, admission: Any = None) -> str | None:
    """What in the core the ladder has to watch, else None (read only; O(requests on workers +
    admission tracks), once per sleep and per invariant check): a hung worker listed, a tombstone
    on a worker with a pid (:func:`tombstones`), or -- with ``admission`` -- a request granted
    ``mem_bytes`` (:func:`single_slot_grants` may hand it a ceiling)."""
    if getattr(router, "hung", None):
        return "hung worker"
    for worker in router.workers.values():
        if worker.pid is not None:
            for req in worker.inflight.values():
                if req.done:
                    return "tombstone"
    if admission is not None:
        for track in getattr(admission, "tracks", {}).values():
            mem = track.granted.get("mem_bytes")
            if isinstance(mem, (int, float)) and mem > 0:
                return "mem_bytes grant"
    return None


class Wake:
    """The core's way to wake a sleeping ladder: installed as ``Router.ladder_wake`` by
    :func:`run`, called where the ladder's work is born (module docstring, "Sleeping while there
    is nothing to watch").  ``asleep``: the shell awaits ``event`` now."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.asleep = False
        self.admission: Any = None  # the shell's (whose mem_bytes grants count as work)
        self.sleeps = 0  # times the shell went to sleep (stats, tests)

    def __call__(self) -> None:
        self.event.set()

    def check_invariants(self, router: Any) -> None:
        """The ladder asleep with no wake-up pending: nothing in the core for it."""
        if self.asleep and not self.event.is_set():
            why = pending(router, self.admission)
            assert why is None, f"the escalation ladder sleeps through a {why}"


async def _relay(stop: asyncio.Event, wake: Wake) -> None:
    await stop.wait()
    wake()  # a sleeping ladder sees ``stop`` too


async def run(router: Any, procs: _Procs, ladder: Ladder, record: Any, stop: asyncio.Event, clock: Any = None,
              admission: Any = None, wake: Wake | None = None) -> None:
    """Poll the router for tombstones every :data:`POLL_S`, read the CPU of the workers holding
    them, and apply the rungs due, until ``stop``; with ``admission``, bill what tombstones burn,
    set per-request memory ceilings (:class:`Ceilings`) and boost workers asked to pause
    (:class:`_PreemptBoost`).  With ``wake`` (installed as ``router.ladder_wake`` until the end),
    sleep while there is nothing to watch (module docstring); without, poll all the time."""
    import time

    clock = clock or time.monotonic
    ceilings = _CeilingShell(router, procs, admission) if admission is not None else None
    frozen: dict[int, str] = {}  # pid -> child, between its freeze and its kill
    bills = _Bills(router, admission) if admission is not None else None
    boosts = (_PreemptBoost(router, procs, admission)
              if admission is not None and hasattr(procs, "boost") and os.environ.get(ENV_PREEMPT_BOOST) == "1" else None)
    relay = None
    if wake is not None:
        wake.admission = admission
        router.ladder_wake = wake
        relay = asyncio.ensure_future(_relay(stop, wake))
    try:
        await _loop(router, procs, ladder, record, stop, clock, wake, ceilings, frozen, bills, boosts)
    finally:
        if wake is not None:
            router.ladder_wake = None
            wake.asleep = False
        if relay is not None:
            relay.cancel()


async def _loop(router: Any, procs: _Procs, ladder: Ladder, record: Any, stop: asyncio.Event, clock: Any,
                wake: Wake | None, ceilings: _CeilingShell | None, frozen: dict[int, str], bills: _Bills | None,
                boosts: _PreemptBoost | None) -> None:
    while not stop.is_set():
        try:
            held, live = tombstones(router, procs)
            now = clock()
            cpu = _readings(held, procs)
            actions = ladder.observe(held, live, now, cpu, _waits(held, procs))
            if bills is not None:
                bills.note([h for h in held if h.token in ladder.tracks], procs)
            if actions:
                apply(actions, procs, record, now, frozen)
                park = getattr(router, "park", None)
                if park is not None:  # no new request into a worker frozen for a tombstone
                    worker_of = {h.token: h.worker for h in held}
                    for a in actions:
                        if a.rung == "freeze" and a.token in worker_of:
                            park(worker_of[a.token], now)
            hung = getattr(router, "hung", None)
            if hung:
                kill_hung(hung, procs, record, now, frozen)
            if bills is not None:
                bills.step(ladder, now)
            else:
                ladder.ended.clear()
            if ceilings is not None:
                ceilings.step(now)
            if boosts is not None:
                boosts.step()
        except Exception:  # the ladder never takes the kernel down
            log.exception("internal error in the escalation ladder")
        if wake is None:
            await asyncio.sleep(POLL_S)
            continue
        # Clear, check, wait: no ``await`` in between, so a birth after the check sets the event
        # the wait sees, and one before it (during this poll) is in the state the check reads.
        wake.event.clear()
        try:
            idle = (not ladder.tracks and not ladder.ended and boosts is None
                    and (bills is None or not bills.jobs)
                    and (ceilings is None or not (ceilings.pure.applied or ceilings.where))
                    and pending(router, wake.admission) is None)
        except Exception:  # polled, as without a wake
            log.exception("internal error in the escalation ladder")
            idle = False
        if not idle:
            await asyncio.sleep(POLL_S)
            continue
        wake.asleep = True
        wake.sleeps += 1
        try:
            await wake.event.wait()
        finally:
            wake.asleep = False


def _waits(held: list[Held], procs: _Procs) -> dict[int, float]:
    """The runqueue wait (seconds) of each worker holding a tombstone, where the OS reports one."""
    out: dict[int, float] = {}
    waited = getattr(procs, "cpu_waited", None)
    if waited is None:
        return out
    for pid in {h.pid for h in held}:
        name = procs.child_of_pid(pid)
        w = waited(name) if name is not None else None
        if w is not None:
            out[pid] = w
    return out


def _readings(held: list[Held], procs: _Procs) -> dict[int, float]:
    """The group CPU seconds of each worker holding a tombstone, where the OS measures one (a
    worker without a reading is judged by the wall-time trigger); a worker on another node is
    asked to have its CPU read often while it holds one (``hurry``: its reading is polled)."""
    out: dict[int, float] = {}
    hurry = getattr(procs, "hurry", None)
    for pid in {h.pid for h in held}:
        name = procs.child_of_pid(pid)
        if hurry is not None and name is not None:
            hurry(name)
        cpu = procs.cpu_seconds(name) if name is not None else None
        if cpu is not None:
            out[pid] = cpu
    return out
