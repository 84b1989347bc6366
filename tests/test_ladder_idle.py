"""Issue 22: an idle kernel's escalation ladder polled 500 times a second for nothing (3-4 % of a
core).  With a :class:`kernel.ladder.Wake` it sleeps while there is nothing to watch, and the core
wakes it where its work is born: a tombstone (``Router.fail_request``), a hung worker
(``Router._sweep``), a ``mem_bytes`` grant (``BudgetAdmission.admit``).

The real ladder (:func:`kernel.ladder.run`) on a real router and admission, a fake host and fake
supervised processes.  A woken ladder runs on the loop's next turn: the tests let the loop turn
(``asyncio.sleep(0)``), never wait for a timer, so nothing here is timed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kernel import codec, errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.host import FakeHost
from kernel.ladder import Ladder, Wake, pending, run
from kernel.mmi import Management
from kernel.principal import Principal
from kernel.router import Router
from tests.support import Wire

BOB = Principal("bob", "client")
ECHO_CHILD = Principal("child:echo", "service:echo")
PID = 4242


class Procs:
    """The supervisor as the ladder sees it: one child, ``echo``, process :data:`PID`, that burns
    nothing (its CPU reading never moves)."""

    def __init__(self) -> None:
        self.killed: list[str] = []
        self.ceilings: list[int | None] = []

    def child_of_pid(self, pid: int) -> str | None:
        return "echo" if pid == PID else None

    def owns_pid(self, name: str, pid: int) -> bool:
        return (name, pid) == ("echo", PID)

    def grace_of(self, name: str) -> float:
        return 0.0

    def keeps_of(self, name: str) -> bool:
        return False

    def cpu_seconds(self, name: str) -> float | None:
        return 1.0

    def kill_group(self, name: str) -> int:
        self.killed.append(name)
        return 1

    def freeze(self, name: str, timeout: float = 0.0) -> float:
        return 0.0

    def thaw(self, name: str) -> None:
        pass

    def memory_ceiling(self, name: str, headroom: int | None) -> int | None:
        self.ceilings.append(headroom)
        return headroom

    def oom_kills(self, name: str) -> int | None:
        return 0


class Kernel:
    """A router and its admission with a one-worker ``echo`` service (process :data:`PID`), the
    ladder running on it with a wake, and a count of the ladder's polls (its clock reads)."""

    def __init__(self, capacity: int = 1, default_limits: dict[str, float] | None = None) -> None:
        self.host = FakeHost(seed=7)
        self.host.children["echo"] = {PID}
        self.wire = Wire()
        self.adm = BudgetAdmission(
            root_limits={"wall_ms": 1e9, "cpu_ms": 1e9},
            default_limits=default_limits or {"wall_ms": 1e6},
            host=self.host,
        )
        self.router = Router(
            self.wire,
            admission=self.adm,
            management=Management(self.adm),
            host=self.host,
            heartbeat_interval=1.0,
            liveness=3,
        )
        self.router.on_message(
            [b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": capacity, "pid": PID})],
            0.0,
            ECHO_CHILD,
        )
        self.procs = Procs()
        self.ladder = Ladder(0.01, 1.0)
        self.wake = Wake()
        self.stop = asyncio.Event()
        self.polls = 0
        self.task: asyncio.Task[None] | None = None
        self.records: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def clock(self) -> float:
        self.polls += 1
        return self.host.now

    def record(self, op: str, now: float, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.records.append((op, inputs, outputs))

    async def start(self, wake: bool = True) -> None:
        self.task = asyncio.ensure_future(
            run(
                self.router,
                self.procs,
                self.ladder,
                self.record,
                self.stop,
                self.clock,
                admission=self.adm,
                wake=self.wake if wake else None,
            )
        )
        await self.turns()

    async def turns(self, n: int = 5) -> None:
        """Let the loop turn ``n`` times (no time passes: no timer of the ladder's is due)."""
        for _ in range(n):
            await asyncio.sleep(0)

    async def until(self, cond: Any, what: str) -> None:
        """Let the polling ladder run until ``cond()``: a generous bound, no timing asserted."""
        for _ in range(5000):
            if cond():
                return
            await asyncio.sleep(0.001)
        pytest.fail(f"never: {what}")

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)  # a sleeping ladder sees ``stop`` (woken by it)
        assert self.router.ladder_wake is None

    def request(self, rid: int, now: float, header: dict[str, Any] | None = None, plain: bool = False) -> bytes:
        """A request from bob's client ``C``; returns its token (dispatched to ``W``)."""
        self.host.now = now
        frames = [b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo"]
        frames += [b"x"] if plain else [codec.pack({"v": 1, "id": rid, **(header or {})}), b"x"]
        self.router.on_message(frames, now, BOB)
        return next(t for t, r in self.router.workers[b"W"].inflight.items() if not r.done)

    def final(self, token: bytes, now: float) -> None:
        self.host.now = now
        status = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
        self.router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, token, b"", status], now, ECHO_CHILD)

    def asleep(self) -> bool:
        self.router.check_invariants()  # runs Wake.check_invariants: asleep => nothing pending
        return self.wake.asleep and not self.wake.event.is_set()


def _go(coro: Any) -> None:
    asyncio.run(coro)


def test_the_ladder_sleeps_while_there_is_nothing_to_watch_and_stops_asleep():
    async def main() -> None:
        k = Kernel()
        await k.start()
        assert k.asleep() and k.router.ladder_wake is k.wake and k.wake.sleeps == 1
        polls = k.polls
        await asyncio.sleep(0.05)  # polling, it would have looked ~25 times
        assert k.polls == polls and k.asleep()
        # live requests come and go: no work for the ladder, no wake
        token = k.request(1, 0.1)
        k.final(token, 0.2)
        await k.turns()
        assert k.polls == polls and k.wake.sleeps == 1
        await k.finish()

    _go(main())


def test_a_tombstone_wakes_the_ladder_which_polls_until_it_ends_then_sleeps_again():
    async def main() -> None:
        k = Kernel()
        await k.start()
        token = k.request(1, 0.1, {"budget": {"wall_ms": 100}})
        await k.turns()
        assert k.asleep()  # a wall deadline is the router's timer, not the ladder's
        k.host.now = 0.3
        k.router.tick(0.3)  # past its budget: answered, its slot kept as a tombstone
        assert k.wake.event.is_set() and pending(k.router) == "tombstone"
        await k.turns()  # the next loop turn, no timer: the tombstone is tracked from its birth
        assert token in k.ladder.tracks and k.ladder.tracks[token].seen == 0.3
        assert not k.wake.asleep
        polls = k.polls
        await k.until(lambda: k.polls > polls + 2, "the ladder polls while it tracks a tombstone")
        k.final(token, 0.35)  # the worker's late FINAL
        await k.until(lambda: k.asleep(), "the ladder back asleep once the tombstone ended")
        assert not k.ladder.tracks and k.ladder.counts["answered"] == 1 and k.wake.sleeps == 2
        await k.finish()

    _go(main())


def test_a_tombstone_left_holding_is_killed_by_the_polling_ladder():
    """The rungs run as before once woken: an exclusive worker holding a tombstone it burns
    nothing on is killed at the kill point (10 ms + 1 s + 100 ms after the answer)."""

    async def main() -> None:
        k = Kernel()
        await k.start()
        token = k.request(1, 0.1)
        req = k.router.workers[b"W"].inflight[token]
        k.host.now = 0.2
        k.router.fail_request(req, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
        await k.turns()
        assert token in k.ladder.tracks
        k.host.now = 1.4
        await k.until(lambda: k.procs.killed == ["echo"], "the idle tombstone's worker killed")
        k.router.on_message([b"W", P.MDPW, P.WorkerCmd.DISCONNECT.value], 1.5, ECHO_CHILD)
        await k.until(lambda: k.asleep(), "the ladder back asleep once the worker is gone")
        await k.finish()

    _go(main())


def test_a_hung_worker_wakes_the_ladder_which_kills_it():
    async def main() -> None:
        k = Kernel()
        await k.start()
        k.request(1, 0.1)
        for t in (1.0, 2.0, 3.0, 3.6):  # silent (no heartbeat) past 3 intervals while it holds one
            k.host.now = t
            k.router.tick(t)
        assert k.router.hung and k.wake.event.is_set()
        await k.turns()
        assert k.procs.killed == ["echo"] and not k.router.hung
        assert [i["why"] for op, i, o in k.records if op == "enforce"] == ["hung"]
        await k.until(lambda: k.asleep(), "the ladder back asleep")
        await k.finish()

    _go(main())


@pytest.mark.parametrize("plain", [False, True])
def test_a_mem_bytes_grant_wakes_the_ladder_which_sets_and_lifts_the_ceiling(plain):
    """A request granted mem_bytes on a single-slot worker gets its ceiling; plain MDP (no
    header: its job's mem_bytes, granted at admission, no forwarded header) too."""

    async def main() -> None:
        k = Kernel(default_limits={"wall_ms": 1e6, "mem_bytes": 64 << 20} if plain else None)
        await k.start()
        token = k.request(1, 0.1, plain=True) if plain else k.request(1, 0.1, {"budget": {"mem_bytes": 64 << 20}})
        assert k.wake.event.is_set() and pending(k.router, k.adm) == "mem_bytes grant"
        await k.turns()
        assert k.procs.ceilings == [64 << 20]  # set on the loop's next turn
        k.final(token, 0.2)
        await k.until(lambda: k.procs.ceilings == [64 << 20, None], "the ceiling lifted")
        await k.until(lambda: k.asleep(), "the ladder back asleep")
        await k.finish()

    _go(main())


def test_a_paused_requests_slot_coming_back_gets_its_ceiling_again():
    """Issue 22's review of the wake points: a single slot that goes from two requests (one
    paused, its slot lent) back to one passes no dispatch hook; the grant keeps the ladder
    polling, so the ceiling is set again within a poll."""

    async def main() -> None:
        k = Kernel()
        await k.start()
        token = k.request(1, 0.1, {"budget": {"mem_bytes": 64 << 20}})
        await k.turns()
        assert k.procs.ceilings == [64 << 20]
        worker = k.router.workers[b"W"]
        other = k.router.workers[b"W"].inflight[token]
        worker.inflight[b"lent-slot"] = other  # a second request in the lent slot: ceiling lifted
        await k.until(lambda: k.procs.ceilings == [64 << 20, None], "the ceiling lifted")
        del worker.inflight[b"lent-slot"]  # it ended: the paused one holds the slot alone again
        await k.until(lambda: k.procs.ceilings == [64 << 20, None, 64 << 20], "the ceiling set again")
        assert not k.wake.asleep
        await k.finish()

    _go(main())


def test_a_birth_without_its_wake_breaks_the_invariant():
    """``Router.check_invariants`` checks a sleeping ladder against the core: a tombstone made
    behind the hook's back is caught."""

    async def main() -> None:
        k = Kernel()
        await k.start()
        token = k.request(1, 0.1)
        req = k.router.workers[b"W"].inflight[token]
        k.router.ladder_wake = None  # as if fail_request had no hook
        k.router.fail_request(req, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
        k.router.ladder_wake = k.wake
        with pytest.raises(AssertionError, match="sleeps through a tombstone"):
            k.router.check_invariants()
        await k.finish()

    _go(main())


def test_without_a_wake_the_ladder_polls_as_before():
    async def main() -> None:
        k = Kernel()
        await k.start(wake=False)
        assert k.router.ladder_wake is None
        await k.until(lambda: k.polls > 5, "the ladder polls")
        assert k.wake.sleeps == 0
        await k.finish()

    _go(main())


# Found by an adversarial review: a worker's departure is not a birth of work, but the ladder prunes
# the workers it killed only when it polls; the router wakes it when a worker goes.
@pytest.mark.parametrize("wake", [False, True], ids=["polling", "sleeping"])
def test_a_worker_that_left_while_the_ladder_slept_is_watched_again_under_the_same_routing_id(wake):
    async def main() -> None:
        k = Kernel()
        await k.start(wake=wake)
        # 1. a tombstone its worker holds without burning: killed at the idle kill point
        token = k.request(1, 0.1)
        req = k.router.workers[b"W"].inflight[token]
        k.host.now = 0.2
        k.router.fail_request(req, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
        await k.until(lambda: token in k.ladder.tracks, "the tombstone tracked")
        k.host.now = 1.4
        await k.until(lambda: k.procs.killed == ["echo"], "the idle tombstone's worker killed")
        # 2. the kill did not take it (kill_group failed, or it raced the answer): its late FINAL
        k.final(token, 1.45)
        if wake:
            await k.until(lambda: k.asleep(), "the ladder asleep: nothing to watch")
        else:
            await k.turns()
        # 3. the worker leaves cleanly (no tombstone, not hung: no wake) and, with the same routing
        #    id, registers again
        k.router.on_message([b"W", P.MDPW, P.WorkerCmd.DISCONNECT.value], 1.5, ECHO_CHILD)
        await k.until(lambda: b"W" not in k.ladder.killed, "the ladder forgets the worker it killed, now gone")
        k.router.on_message(
            [b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 1, "pid": PID})], 2.0, ECHO_CHILD
        )
        # 4. a new tombstone on the new incarnation must be watched
        token2 = k.request(2, 2.1)
        req2 = k.router.workers[b"W"].inflight[token2]
        k.host.now = 2.2
        k.router.fail_request(req2, errors.BudgetExceeded("request wall_ms budget ran out"), 2.2)
        await k.until(lambda: token2 in k.ladder.tracks, "the new incarnation's tombstone tracked")
        k.host.now = 3.5
        await k.until(lambda: k.procs.killed == ["echo", "echo"], "the new tombstone's worker killed")
        await k.finish()

    asyncio.run(main())
