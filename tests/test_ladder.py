"""The escalation ladder: the pure part with a fake clock, and issue 23's attack rerun against a
real kernel -- an echo worker stuck in a 20 s step past a 500 ms budget is answered
``budget_exceeded`` on time, then frozen and killed by the OS, and restarted by the supervisor,
instead of burning 17 CPU-seconds."""

from __future__ import annotations

import time

import pytest

from clients import Client
from kernel import errors
from kernel import protocol as P
from kernel.ladder import Held, Ladder
from tests.support import KernelProcess, service_block, wait_restarted
from kernel.logstore import read_records

A, B = b"tok-a", b"tok-b"
W1, W2 = b"w1", b"w2"


def test_a_worker_that_answers_within_the_grace_is_left_alone():
    lad = Ladder(0.02, 1.0)
    assert lad.observe([Held(A, 10, W1)], {W1}, 0.0) == []
    assert lad.observe([], {W1}, 0.01) == []  # its late FINAL came
    assert lad.tracks == {} and lad.counts["answered"] == 1
    assert lad.next_due() is None


def test_freeze_after_the_grace_thaw_after_the_second_then_kill():
    lad = Ladder(0.02, 1.0, 0.1)
    both = [Held(A, 10, W1), Held(B, 10, W1)]
    lad.observe(both, {W1}, 0.0)
    assert lad.next_due() == pytest.approx(0.02)
    assert lad.observe(both, {W1}, 0.019) == []
    acts = lad.observe(both, {W1}, 0.02)
    assert [(a.rung, a.pid) for a in acts] == [("freeze", 10)]  # one freeze per process
    assert lad.observe(both, {W1}, 0.5) == []
    acts = lad.observe(both, {W1}, 1.02)
    assert [(a.rung, a.pid) for a in acts] == [("thaw", 10)]  # a chance to answer the cancel it holds
    assert lad.next_due() == pytest.approx(1.12)
    acts = lad.observe(both, {W1}, 1.12)
    assert [(a.rung, a.pid) for a in acts] == [("kill", 10)]  # one kill per process
    assert lad.tracks == {}


def test_a_slow_cooperative_worker_that_answers_once_thawed_is_not_killed():
    lad = Ladder(0.02, 1.0, 0.1)
    lad.observe([Held(A, 10, W1)], {W1}, 0.0)
    assert [a.rung for a in lad.observe([Held(A, 10, W1)], {W1}, 0.03)] == ["freeze"]
    assert [a.rung for a in lad.observe([Held(A, 10, W1)], {W1}, 1.03)] == ["thaw"]
    assert lad.observe([], {W1}, 1.05) == []  # its FINAL came at its next safe point
    assert lad.tracks == {} and lad.counts["answered"] == 1 and lad.counts["killed"] == 0


def test_an_answer_that_crossed_the_freeze_thaws_the_worker():
    # the FINAL was on its way when the freeze was written: the group is frozen with nothing held,
    # and nothing else would ever thaw it (its heartbeats stop, the supervisor sees it alive)
    lad = Ladder(0.02, 1.0, 0.1)
    lad.observe([Held(A, 10, W1)], {W1}, 0.0)
    assert [a.rung for a in lad.observe([Held(A, 10, W1)], {W1}, 0.03)] == ["freeze"]
    acts = lad.observe([], {W1}, 0.04)
    assert [(a.rung, a.pid, a.why) for a in acts] == [("thaw", 10, "answered")]
    assert lad.tracks == {} and lad.counts["answered"] == 1 and lad.counts["killed"] == 0
    # while another request of the same process is still held, its own rungs go on instead
    lad = Ladder(0.02, 1.0, 0.1)
    both = [Held(A, 10, W1), Held(B, 10, W1)]
    lad.observe(both, {W1}, 0.0)
    assert [a.rung for a in lad.observe(both, {W1}, 0.03)] == ["freeze"]
    assert lad.observe([Held(B, 10, W1)], {W1}, 0.04) == []
    assert [a.rung for a in lad.observe([Held(B, 10, W1)], {W1}, 1.03)] == ["thaw"]


def test_a_worker_that_still_serves_live_requests_is_not_frozen_for_one_tombstone():
    # a multi-slot worker (decode's sessions, another principal's call): freezing it for one
    # answered request would stop the live ones too; the rungs start once it holds only tombstones
    lad = Ladder(0.02, 1.0, 0.1)
    assert lad.observe([Held(A, 10, W1, shared=True)], {W1}, 0.0) == []
    assert lad.observe([Held(A, 10, W1, shared=True)], {W1}, 5.0) == []
    assert lad.counts["frozen"] == 0 and A in lad.tracks
    acts = lad.observe([Held(A, 10, W1)], {W1}, 5.001)  # the live request ended: past its grace
    assert [(a.rung, a.pid) for a in acts] == [("freeze", 10)]


def test_a_frozen_worker_dropped_by_liveness_is_killed_at_once():
    lad = Ladder(0.02, 1.0)
    lad.observe([Held(A, 10, W1)], {W1, W2}, 0.0)
    assert [a.rung for a in lad.observe([Held(A, 10, W1)], {W1, W2}, 0.03)] == ["freeze"]
    # the worker missed its heartbeats (frozen): the router dropped it and its tombstone with it
    assert [a.rung for a in lad.observe([], {W2}, 0.1)] == ["kill"]


def test_graces_must_be_non_negative():
    with pytest.raises(ValueError):
        Ladder(-1, 1)


@pytest.mark.system
def test_a_step_that_ignores_its_cancel_is_frozen_killed_and_restarted():
    k = KernelProcess(service_block("echo", "services.echo"), heartbeat=0.5, liveness=6)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("echo", 30)
            first = next(ch["pid"] for ch in c.stats()["children"] if ch["name"] == "echo")
            c.open_job("short", {"wall_ms": 500})
            with pytest.raises(errors.BudgetExceeded):
                c.call("echo", {"steps": 1, "step_ms": 20_000}, job="short")
            assert wait_restarted(c, "echo", first), "the stuck worker was not killed and restarted"
            c.wait_for_service("echo", 30)
            assert c.call("echo", {"steps": 2, "step_ms": 1})["steps_done"] == 2
            c.stats()  # flushes the decision log
        # the stop rungs in order; "bill" records (CPU burnt past the answer, billed to the job as it
        # is measured) may fall between them
        rungs = [r for r in read_records(k.decision_log)
                 if r.get("op") == "enforce" and r["in"]["rung"] != "bill"]
        assert [r["in"]["rung"] for r in rungs][:3] == ["freeze", "thaw", "kill"]
        freeze, thaw, kill = rungs[0], rungs[1], rungs[2]
        assert kill["out"]["ok"], kill
        if freeze["out"]["ok"]:  # (a freeze past its bound on a very busy machine is recorded as not ok)
            # frozen: the CPU the OS measured for the worker's group stopped growing until the thaw
            assert thaw["out"]["cpu_s"] == pytest.approx(freeze["out"]["cpu_s"], abs=0.05)
    finally:
        k.stop()


def test_a_declared_grace_defers_the_freeze():
    lad = Ladder(0.02, 1.0)
    lad.observe([Held(A, 10, W1, grace=2.0)], {W1}, 0.0)
    assert lad.next_due() == pytest.approx(2.0)
    assert lad.observe([Held(A, 10, W1, grace=2.0)], {W1}, 1.9) == []  # inside the service's declared grace
    assert [a.rung for a in lad.observe([Held(A, 10, W1, grace=2.0)], {W1}, 2.0)] == ["freeze"]
    # a grace shorter than the ladder's own changes nothing
    lad.observe([Held(B, 11, W2, grace=0.001)], {W1, W2}, 3.0)
    assert lad.observe([Held(B, 11, W2, grace=0.001)], {W1, W2}, 3.01) == []


def _rungs(path: str) -> list[dict]:
    return [r for r in read_records(path) if r.get("op") == "enforce"]


@pytest.mark.system
def test_a_kernel_stopped_while_its_worker_is_frozen_leaves_nothing_behind():
    """The kill rung is far away (10 min): the worker stays frozen until the kernel's SIGTERM, whose
    shutdown must thaw it to stop it (before, it waited for ever on a frozen child's exit)."""
    k = KernelProcess(service_block("echo", "services.echo") + "\n[enforce]\nkill_grace_ms = 600000.0\n",
                      heartbeat=0.5, liveness=1000)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("echo", 30)
            c.open_job("short", {"wall_ms": 300})
            with pytest.raises(errors.BudgetExceeded):
                c.call("echo", {"steps": 1, "step_ms": 60_000}, job="short")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                c.stats()  # flushes the decision log
                if any(r["in"]["rung"] == "freeze" for r in _rungs(k.decision_log)):
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the worker holding its answered request was not frozen")
    finally:
        k.stop()  # asserts the kernel stopped within its bound and no process it started survived


def _v1_writable() -> str | None:
    import os

    from kernel import enforce as E

    if os.geteuid() != 0:
        return "per-request memory ceilings need cgroups (root here)"
    missing = [c for c in E.V1_CONTROLLERS if c not in E._mounts(E.CGROUP_ROOT)]
    return f"cgroup v1 hierarchies {missing} not mounted" if missing else None


@pytest.mark.system
@pytest.mark.skipif(_v1_writable() is not None, reason=_v1_writable() or "")
def test_a_request_over_its_mem_bytes_is_killed_and_answered_memory_exceeded():
    """A single-slot worker's group gets the request's mem_bytes (above what it uses) as its
    ceiling while the request holds the slot: allocating 600 MiB under a 64 MiB grant, the worker
    is OOM-killed and the request answered memory_exceeded; the supervisor restarts the worker, the
    ceiling is lifted, and the next request (no grant) runs."""
    k = KernelProcess(service_block("alloc", "tests.alloc_service"), heartbeat=0.5, liveness=6)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("alloc", 30)
            assert c.call("alloc", {"alloc_mb": 8}, budget={"mem_bytes": 256 << 20})["allocated_mb"] == 8
            with pytest.raises(errors.MemoryExceeded) as info:
                c.call("alloc", {"alloc_mb": 600}, budget={"mem_bytes": 64 << 20})
            assert info.value.detail["mem_bytes"] == 64 << 20
            c.wait_for_service("alloc", 30)
            deadline = time.monotonic() + 60
            while True:  # the old worker's registration goes at its liveness; a call may land on it
                try:
                    assert c.call("alloc", {"alloc_mb": 100})["allocated_mb"] == 100  # no ceiling left
                    break
                except (errors.WorkerDied, errors.Unavailable):  # restarting on a busy machine
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            c.stats()
        rungs = [r["in"]["rung"] for r in _rungs(k.decision_log)]
        assert "memory_ceiling" in rungs and "oom" in rungs
    finally:
        k.stop()


def test_ceilings_follow_the_request_in_a_single_slot():
    from kernel.ladder import Ceilings

    c = Ceilings()
    assert c.observe({10: (A, 64 << 20), 11: (B, None)}) == ([(10, A, 64 << 20)], [])  # no grant: no ceiling
    assert c.observe({10: (A, None)}) == ([], [])  # its tombstone (grant forgotten) keeps the ceiling
    assert c.observe({10: (B, 32 << 20)}) == ([(10, B, 32 << 20)], [10])  # the next request: lifted, set again
    assert c.observe({}) == ([], [10]) and c.applied == {}


@pytest.mark.system
def test_cpu_burnt_after_the_answer_is_billed_to_the_job():
    """The worker ignores its cancel for the freeze grace (300 ms here): the CPU its group burnt
    from the kernel's answer to the kill is charged to the request's job (``bill`` records, every
    50 ms of CPU and at the end) and shows in the job's spent cpu_ms."""
    k = KernelProcess(service_block("echo", "services.echo")
                      + "\n[enforce]\nfreeze_grace_ms = 300.0\nkill_grace_ms = 100.0\n", heartbeat=0.5, liveness=6)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("echo", 30)
            c.open_job("tail", {"wall_ms": 300})
            with pytest.raises(errors.BudgetExceeded):
                c.call("echo", {"steps": 1, "step_ms": 20_000}, job="tail")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                c.stats()  # flushes the decision log
                bills = [r for r in _rungs(k.decision_log) if r["in"]["rung"] == "bill"]
                if bills:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("no CPU was billed for the 300 ms the worker ignored its cancel")
            c.wait_for_service("echo", 30)  # killed and restarted: every bill is in
            bills = [r for r in _rungs(k.decision_log) if r["in"]["rung"] == "bill"]
            assert {b["in"]["job"] for b in bills} == {"tail"} and all(b["out"]["cpu_ms"] > 0 for b in bills)
            spent = c.mmi(P.MMI_JOB_STATS, {"job": "tail"})["spent"]
            assert spent["cpu_ms"] >= sum(b["out"]["cpu_ms"] for b in bills) - 1e-6
    finally:
        k.stop()


def test_a_remote_worker_gets_its_own_answer_window_after_the_thaw():
    # a Ray-placed worker is thawed through its node agent and answers over the network: its
    # window (Held.answer_grace, kernel/supervisor.py answer_grace_of) replaces the ladder's 100 ms
    lad = Ladder(0.02, 1.0, 0.1)
    remote = [Held(A, 10, W1, answer_grace=0.6)]
    local = [Held(B, 11, W2)]
    lad.observe(remote + local, {W1, W2}, 0.0)
    assert sorted(a.pid for a in lad.observe(remote + local, {W1, W2}, 0.02)) == [10, 11]  # both frozen
    assert sorted(a.rung for a in lad.observe(remote + local, {W1, W2}, 1.02)) == ["thaw", "thaw"]
    assert lad.next_due() == pytest.approx(1.12)  # the local one's window ends first
    acts = lad.observe(remote + local, {W1, W2}, 1.12)
    assert [(a.rung, a.pid) for a in acts] == [("kill", 11)]  # the local worker: its 100 ms are over
    assert lad.next_due() == pytest.approx(1.62)
    assert lad.observe(remote, {W1, W2}, 1.5) == []  # still within its own window
    assert lad.observe([], {W1, W2}, 1.55) == []  # its late FINAL came: answered, alive
    assert lad.counts["answered"] == 1 and lad.counts["killed"] == 1


def test_a_remote_worker_that_does_not_answer_in_its_window_is_killed():
    lad = Ladder(0.02, 1.0, 0.1)
    remote = [Held(A, 10, W1, answer_grace=0.6)]
    lad.observe(remote, {W1}, 0.0)
    lad.observe(remote, {W1}, 0.02)
    lad.observe(remote, {W1}, 1.02)
    assert lad.observe(remote, {W1}, 1.6) == []
    assert [(a.rung, a.why) for a in lad.observe(remote, {W1}, 1.62)] == [("kill", "answer window")]


def test_a_remote_answer_window_is_capped_and_floored():
    # one slow agent round trip (a call that timed out counts 10 s) must not stretch the window
    # without bound; a window below the ladder's own gets the ladder's
    lad = Ladder(0.02, 1.0, 0.1, answer_cap=2.0)
    slow = [Held(A, 10, W1, answer_grace=0.5 + 2 * 10.0)]
    quick = [Held(B, 11, W2, answer_grace=0.01)]
    lad.observe(slow + quick, {W1, W2}, 0.0)
    lad.observe(slow + quick, {W1, W2}, 0.02)  # both frozen
    assert sorted(a.rung for a in lad.observe(slow + quick, {W1, W2}, 1.02)) == ["thaw", "thaw"]
    assert lad.observe(slow + quick, {W1, W2}, 1.11) == []  # the floor: the local 100 ms, not 10 ms
    assert [(a.rung, a.pid) for a in lad.observe(slow + quick, {W1, W2}, 1.12)] == [("kill", 11)]
    assert lad.next_due() == pytest.approx(3.02)  # the cap: 2 s, not 20.5 s
    assert [(a.rung, a.pid, a.why) for a in lad.observe(slow, {W1, W2}, 3.02)] == [("kill", 10, "answer window")]


def test_a_cap_below_the_ladders_own_window_is_raised_to_it():
    lad = Ladder(0.02, 1.0, 0.3, answer_cap=0.1)
    assert lad.answer_cap == 0.3


def test_a_tombstones_answer_window_is_fixed_when_it_is_first_seen():
    # the supervisor offers a window from the latest round trips at every look; a slow round trip
    # measured after the tombstone was first seen does not move the window already given
    lad = Ladder(0.02, 1.0, 0.1)
    lad.observe([Held(A, 10, W1, answer_grace=0.6)], {W1}, 0.0)
    lad.observe([Held(A, 10, W1, answer_grace=0.6)], {W1}, 0.02)
    later = [Held(A, 10, W1, answer_grace=1.9)]
    assert [a.rung for a in lad.observe(later, {W1}, 1.02)] == ["thaw"]
    assert lad.next_due() == pytest.approx(1.62)
    assert [(a.rung, a.why) for a in lad.observe(later, {W1}, 1.62)] == [("kill", "answer window")]
