"""Issue 23, found by rerunning its attacks: a worker that stops heartbeating while it computes
(one long step that never yields) missed its liveness window, the kernel answered its request
``worker_died`` and forgot it -- and the process went on burning 14 CPU-seconds nobody was billed
for, out of the ladder's reach.  Also: the CPU a request burnt before the kernel answered it
(budget, cancel, its worker lost) was not billed, and a client could spare its own spinning
tombstone by parking a live request of its own on the same worker.

The router lists a worker dropped while it held requests as hung (``Router.hung``); the ladder
kills its group (``kill_hung``); the kernel bills the CPU measured from dispatch to its own
answer; only another principal's live requests spare a worker."""

from __future__ import annotations

import collections

import pytest

from clients import Client
from kernel import codec, errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.host import FakeHost
from kernel.ladder import kill_hung, tombstones
from kernel.logstore import read_records
from kernel.mmi import Caller, Management
from kernel.principal import Principal
from kernel.router import MAX_HUNG, Hung, Router
from tests.support import KernelProcess, Wire, service_block, wait_restarted

ALICE = Principal("alice", "client")
BOB = Principal("bob", "client")
ECHO_CHILD = Principal("child:echo", "service:echo")


def _kernel(host: FakeHost, capacity: int = 1, pid: int = 4242) -> tuple[Router, BudgetAdmission, Wire]:
    wire = Wire()
    adm = BudgetAdmission(root_limits={"wall_ms": 1e9, "cpu_ms": 1e9}, default_limits={"wall_ms": 1e6}, host=host)
    router = Router(wire, admission=adm, management=Management(adm), host=host, heartbeat_interval=1.0, liveness=3)
    host.children["echo"] = {pid}
    router.on_message(
        [b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": capacity, "pid": pid})],
        0.0,
        ECHO_CHILD,
    )
    return router, adm, wire


def _advance(router: Router, to: float, step: float = 0.25) -> None:
    """Time passes as in a running kernel: a tick (and its liveness sweep) every quarter interval."""
    t = router.now
    while t < to:
        t = min(to, t + step)
        router.tick(t)


def _open(router: Router, who: Principal, client: bytes, job: str, budget: dict, now: float) -> None:
    out = router.management.handle(router, P.MMI_JOB_OPEN, {"job": job, "budget": budget}, now, Caller(client, who))
    assert not isinstance(out, errors.RecaError), out


def _request(router: Router, client: bytes, rid: int, job: str | None, now: float, who: Principal) -> None:
    header = {"v": 1, "id": rid, **({"job": job} if job else {})}
    router.on_message([client, P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack(header), b"x"], now, who)


def test_a_worker_silent_past_its_liveness_while_busy_is_listed_hung_and_its_cpu_billed():
    host = FakeHost(seed=3)
    host.cpu[4242] = 10.0
    router, adm, wire = _kernel(host)
    _open(router, BOB, b"C1", "b1", {"cpu_ms": 60_000, "wall_ms": 600_000}, 0.0)
    _request(router, b"C1", 1, "b1", 0.5, BOB)
    assert router.workers[b"W"].inflight  # dispatched
    host.cpu[4242] = 12.5  # 2.5 s of CPU burnt on it, and not one heartbeat
    _advance(router, 2.0)
    assert not router.hung
    _advance(router, 3.6)  # last heard of at 0.0 (READY): silent for more than 3 intervals
    router.check_invariants()
    (final,) = wire.finals()
    assert final["error"]["code"] == "worker_died"
    # the CPU it burnt from dispatch to the kernel's answer is measured and billed
    assert final["spent"]["cpu_ms"] == pytest.approx(2500.0)
    assert adm.ledger.jobs["b1"].spent["cpu_ms"] == pytest.approx(2500.0)
    (hung,) = router.hung
    assert (hung.pid, hung.identity, hung.service, hung.at) == (4242, b"W", "echo", 3.0)  # its expiry
    assert len(hung.tokens) == 1


def test_an_idle_worker_silent_past_its_liveness_is_dropped_not_hung():
    host = FakeHost(seed=3)
    router, _, _ = _kernel(host)
    _advance(router, 3.6)
    assert not router.workers and not router.hung  # nothing held: not killed (it may come back)


def test_the_hung_list_is_bounded():
    host = FakeHost(seed=3)
    router, _, _ = _kernel(host)
    router.hung.extend(Hung(i, b"W%d" % i, "echo", (b"t",), 0.0) for i in range(MAX_HUNG))
    _request(router, b"C1", 1, None, 0.5, BOB)
    _advance(router, 3.6)
    assert len(router.hung) == MAX_HUNG and router.hung[-1].pid == 4242
    assert router.counters["hung_dropped"] == 1
    router.check_invariants()


def test_a_worker_with_several_slots_is_not_billed_to_one_of_its_requests():
    """Its CPU is not one request's: a spin in one slot must not drain the job of the request in
    the other (the review's repro: alice billed 2,900 ms of bob's spin)."""
    host = FakeHost(seed=5)
    host.cpu[4242] = 0.0
    router, adm, wire = _kernel(host, capacity=2)
    _open(router, ALICE, b"C2", "a1", {"cpu_ms": 1000, "wall_ms": 600_000}, 0.0)
    _request(router, b"C2", 1, "a1", 0.1, ALICE)
    _request(router, b"C1", 1, None, 0.1, BOB)
    host.cpu[4242] = 2.9
    _advance(router, 3.6)
    assert [f["error"]["code"] for f in wire.finals()] == ["worker_died", "worker_died"]
    assert all("cpu_ms" not in f["spent"] for f in wire.finals())
    assert adm.ledger.jobs["a1"].exhausted is None and not adm.ledger.jobs["a1"].spent.get("cpu_ms")


def _two_of_a_1s_cpu_job(seed: int) -> tuple[FakeHost, Router, BudgetAdmission, Wire]:
    """A one-slot worker running bob's request of a job with 1 s of cpu_ms, a second one queued."""
    host = FakeHost(seed=seed)
    host.cpu[4242] = 0.0
    router, adm, wire = _kernel(host, capacity=1)
    _open(router, BOB, b"C1", "b1", {"cpu_ms": 1000, "wall_ms": 600_000}, 0.0)
    _request(router, b"C1", 1, "b1", 0.1, BOB)
    _request(router, b"C1", 2, "b1", 0.1, BOB)  # queued behind it
    return host, router, adm, wire


def test_a_kernel_answer_whose_cpu_exhausts_the_job_cancels_the_jobs_other_requests():
    host, router, adm, wire = _two_of_a_1s_cpu_job(seed=5)
    host.cpu[4242] = 3.0  # 3 s of CPU on a 1 s job, reported by nobody
    req = next(iter(router.workers[b"W"].inflight.values()))
    router.fail_request(req, errors.Cancelled("cancelled by its owner"), 0.5)
    router.check_invariants()
    codes = sorted(f["error"]["code"] for f in wire.finals())
    assert codes == ["budget_exceeded", "cancelled"]  # the job ran out: its other request too
    assert adm.ledger.jobs["b1"].exhausted == "cpu_ms"


def test_only_another_principals_live_request_spares_a_tombstones_worker():
    host = FakeHost(seed=7)
    router, _, _ = _kernel(host, capacity=2)
    _request(router, b"C1", 1, None, 0.1, BOB)
    _request(router, b"C1", 2, None, 0.1, BOB)
    first = next(iter(router.workers[b"W"].inflight.values()))
    router.fail_request(first, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
    held, _ = tombstones(router)
    assert [h.shared for h in held] == [False]  # bob's own live request does not spare it

    host2 = FakeHost(seed=7)
    router2, _, _ = _kernel(host2, capacity=2)
    _request(router2, b"C1", 1, None, 0.1, BOB)
    _request(router2, b"C2", 1, None, 0.1, ALICE)
    bobs = next(r for r in router2.workers[b"W"].inflight.values() if r.principal is BOB)
    router2.fail_request(bobs, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
    held2, _ = tombstones(router2)
    assert [h.shared for h in held2] == [True]  # alice's would be lost with it


class Procs:
    def __init__(self, keeps: bool = False, stopped: bool = False) -> None:
        self.killed: list[str] = []
        self.keeps, self.is_stopped = keeps, stopped

    def child_of_pid(self, pid: int) -> str | None:
        return {4242: "echo"}.get(pid)

    def owns_pid(self, name: str, pid: int) -> bool:
        return (name, pid) == ("echo", 4242)

    def keeps_of(self, name: str) -> bool:
        return self.keeps

    def stopped(self, name: str) -> bool:
        return self.is_stopped

    def kill_group(self, name: str) -> int:
        self.killed.append(name)
        return 2

    def cpu_seconds(self, name: str) -> float | None:
        return 12.5


def test_kill_hung_kills_each_supervised_hung_worker_once_and_records_it():
    hung = collections.deque([Hung(4242, b"W", "echo", (b"\x01" * 16,), 3.6), Hung(777, b"X", "echo", (b"t",), 3.6)])
    procs, records = Procs(), []
    frozen = {4242: "echo"}
    kill_hung(hung, procs, lambda op, now, i, o: records.append((op, i, o)), 3.7, frozen)
    assert not hung and procs.killed == ["echo"] and frozen == {}
    (op1, in1, out1), (op2, in2, out2) = records
    assert (op1, in1["rung"], in1["why"], in1["child"], out1["ok"], out1["killed"]) == (
        "enforce",
        "kill",
        "hung",
        "echo",
        True,
        2,
    )
    assert in1["silent_since"] == pytest.approx(0.1)
    assert (in2["pid"], out2["ok"]) == (777, False)  # not a child of this kernel: recorded, not signalled


def test_a_step_that_never_yields_past_the_liveness_window_is_killed_billed_and_restarted():
    """The attack itself, on real processes: an echo step of 20 s that never reaches a safe point
    (so no heartbeat either), in a job with a 60 s wall budget the step never reaches."""
    k = KernelProcess(service_block("echo", "services.echo"), heartbeat=0.5, liveness=4)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("echo", 30)
            first = next(ch["pid"] for ch in c.stats()["children"] if ch["name"] == "echo")
            c.open_job("long", {"wall_ms": 60_000, "cpu_ms": 60_000})
            with pytest.raises(errors.WorkerDied) as died:
                c.call("echo", {"steps": 1, "step_ms": 20_000}, job="long")
            assert died.value.detail["spent"].get("cpu_ms", 0) > 0  # billed up to the kernel's answer
            assert wait_restarted(c, "echo", first), "the hung worker was not killed and restarted"
            c.wait_for_service("echo", 30)
            assert c.call("echo", {"steps": 2, "step_ms": 1})["steps_done"] == 2
            job = c.stats()["jobs"]["long"]
            assert job["spent"].get("cpu_ms", 0) >= died.value.detail["spent"]["cpu_ms"] - 1e-6
        kills = [r for r in read_records(k.decision_log) if r.get("op") == "enforce" and r["in"]["rung"] == "kill"]
        assert kills and kills[0]["in"]["why"] == "hung" and kills[0]["out"]["ok"], kills
        assert kills[0]["in"]["pid"] == first
    finally:
        k.stop()


def test_kill_hung_goes_by_the_workers_child_not_a_pid_another_node_may_share():
    procs, records = Procs(), []
    # a Ray-placed replica "remote" whose node pid is 4242, the same number as local echo's
    hung = collections.deque([Hung(4242, b"R", "remote", (b"t",), 1.0, child="remote")])
    kill_hung(hung, procs, lambda op, now, i, o: records.append((i, o)), 1.1)
    assert procs.killed == [] and records[0][1]["ok"] is False  # not echo: the pid is not remote's here
    hung = collections.deque([Hung(4242, b"W", "echo", (b"t",), 1.0, child="echo")])
    kill_hung(hung, procs, lambda op, now, i, o: records.append((i, o)), 1.1)
    assert procs.killed == ["echo"]


@pytest.mark.parametrize(
    "procs, frozen, why",
    [
        (Procs(keeps=True), {}, "its service keeps state"),
        (Procs(stopped=True), {}, "stopped by an operator"),
    ],
)
def test_a_hung_worker_that_keeps_state_or_an_operator_stopped_is_spared(procs, frozen, why):
    records = []
    hung = collections.deque([Hung(4242, b"W", "echo", (b"t",), 1.0, child="echo")])
    kill_hung(hung, procs, lambda op, now, i, o: records.append((i, o)), 1.1, frozen)
    assert procs.killed == []
    assert records[0][0]["rung"] == "spare" and records[0][1]["why"] == why


def test_a_hung_worker_the_ladder_froze_is_killed_even_though_stopped():
    procs, records = Procs(stopped=True), []
    hung = collections.deque([Hung(4242, b"W", "echo", (b"t",), 1.0, child="echo")])
    kill_hung(hung, procs, lambda op, now, i, o: records.append((i, o)), 1.1, {4242: "echo"})
    assert procs.killed == ["echo"]


def test_two_local_clients_spare_each_other_and_a_service_acting_for_two_principals_too():
    host = FakeHost(seed=9)
    router, _, _ = _kernel(host, capacity=2)
    operator = Principal("local", "operator")  # every ipc:// peer is the one local operator
    _request(router, b"C1", 1, None, 0.1, operator)
    _request(router, b"C2", 1, None, 0.1, operator)
    first = next(r for r in router.workers[b"W"].inflight.values() if r.client == b"C1")
    router.fail_request(first, errors.Cancelled("cancelled by its owner"), 0.2)
    held, _ = tombstones(router)
    assert [h.shared for h in held] == [True]  # told apart by their connections


def test_a_malformed_final_whose_cpu_exhausts_the_job_cancels_its_other_requests_at_once():
    host, router, adm, wire = _two_of_a_1s_cpu_job(seed=11)
    (token,) = router.workers[b"W"].inflight
    host.cpu[4242] = 3.0
    router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, token, b"", b"\xc1"], 0.5, ECHO_CHILD)
    router.check_invariants()
    codes = sorted(f["error"]["code"] for f in wire.finals())
    assert codes == ["budget_exceeded", "service_error"]
    assert adm.ledger.jobs["b1"].exhausted == "cpu_ms"


def _dispatched(wire: Wire, worker: bytes) -> int:
    return sum(1 for m in wire.sent if m[0] == worker and m[2] == P.WorkerCmd.REQUEST.value)


def test_no_new_request_goes_to_a_worker_the_ladder_froze_until_its_tombstone_ends():
    """The review's attack 2, second form: alice's request sent after bob's spin was frozen went into
    the frozen worker's free slot, stopped with it, and spared it from the kill (16 s, then
    worker_died).  A parked worker's free slots take nothing new."""
    host = FakeHost(seed=13)
    router, _, wire = _kernel(host, capacity=2)
    _request(router, b"C1", 1, None, 0.1, BOB)
    (bobs,) = router.workers[b"W"].inflight.values()
    router.fail_request(bobs, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
    router.park(b"W", 0.21)  # the ladder froze it
    _request(router, b"C2", 1, None, 0.3, ALICE)
    router.check_invariants()
    assert _dispatched(wire, b"W") == 1 and router.services[b"echo"].queued == 1  # alice's waits
    # a second worker registers: alice's request goes there, not to the frozen one
    router.on_message([b"V", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 1})], 0.4)
    assert _dispatched(wire, b"V") == 1 and router.services[b"echo"].queued == 0
    _request(router, b"C2", 2, None, 0.5, ALICE)  # V is busy, W parked: queued
    assert router.services[b"echo"].queued == 1
    # bob's worker answers its cancel at last: its tombstone ends, it is unparked, alice's runs there
    status = codec.pack({"v": 1, "id": 1, "status": "error", "spent": {}})
    router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, bobs.token, b"", status], 1.0, ECHO_CHILD)
    router.check_invariants()
    assert not router.parked and router.services[b"echo"].queued == 0 and _dispatched(wire, b"W") == 2


def test_a_parked_worker_that_goes_is_forgotten():
    host = FakeHost(seed=13)
    router, _, _ = _kernel(host, capacity=2)
    _request(router, b"C1", 1, None, 0.1, BOB)
    (bobs,) = router.workers[b"W"].inflight.values()
    router.fail_request(bobs, errors.BudgetExceeded("request wall_ms budget ran out"), 0.2)
    router.park(b"W", 0.2)
    _advance(router, 3.6)  # silent past its window (killed by the ladder as hung)
    assert not router.parked and not router.workers
    router.check_invariants()


def test_a_sweep_a_whole_interval_late_drops_a_silent_worker_but_does_not_call_it_hung():
    """The kernel itself did not run for a while (a stall, a paused VM): the silence it finds may
    be its own, so a busy worker is dropped (as ever: it re-registers) but not killed."""
    host = FakeHost(seed=3)
    router, _, wire = _kernel(host)
    _request(router, b"C1", 1, None, 0.5, BOB)
    _advance(router, 1.0)
    router.tick(3.6)  # 2.6 s since the last sweep
    assert not router.workers and not router.hung
    assert router.counters["hung_unjudged_late_sweep"] == 1
    assert [f["error"]["code"] for f in wire.finals()] == ["worker_died"]
