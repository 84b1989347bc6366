"""System tests of ``cpcs`` through a real ``python -m kernel``: dispatch to real ``work``
processes, decisions streamed and written to the kernel's decision log, re-estimation from the
tasks' own progress, preemption of off-path work (a real pause at a safe point, ordered through
``mmi.preempt`` / ``mmi.resume``), typed errors before anything runs, and recovery when a task's
worker is SIGKILLed mid-task."""

from __future__ import annotations

import os
import signal

import pytest

from kernel import errors
from services.cpcs import gantt
from tests.support import service_block, client_fixture, kernel_fixture
from kernel.logstore import read_records

pytestmark = pytest.mark.system

WAIT_S = 30.0


kern = kernel_fixture(service_block("work", "services.cpcs.work", replicas=2) + service_block("cpcs", "services.cpcs"),
                      heartbeat=0.2, liveness=10)  # a 2 s window: this shared machine stalls processes
client = client_fixture("cpcs", "work@0", "work@1", timeout=WAIT_S, wait_s=WAIT_S)


def W(tid, ms, deps=(), eta=None, **kw):
    """A task holding a work worker for ``ms`` (estimate ``eta`` s, default exact)."""
    return {"id": tid, "service": "work", "eta_s": eta if eta is not None else ms / 1000, "deps": list(deps),
            "payload": {"ms": ms, "steps": max(1, ms // 20)}, **kw}


def run(client, tasks, partials=None, **kw):
    def on_partial(reply):
        if partials is not None:
            partials.append(reply.payload)
    return client.call("cpcs", {"dag": {"tasks": tasks}, **kw}, on_partial=on_partial, timeout=WAIT_S)


def evs(out, ev, task=None):
    return [e for e in out["events"] if e["ev"] == ev and (task is None or e.get("task") == task)]


def log_lines(kern):
    return read_records(kern.decision_log)


def test_bad_dags_are_refused_before_anything_runs(client):
    before = client.stats()["services"]
    bad = [
        [W("a", 10, ["b"]), W("b", 10, ["a"])],
        [W("a", 10, ["nope"])],
        [W("a", 10, eta=-1.0)],
        [W("a", 10, eta=float("nan"))],
        [W("a", 10), {**W("b", 10), "service": "no-such-service"}],
    ]
    for tasks in bad:
        with pytest.raises(errors.BadRequest):
            run(client, tasks)
    with pytest.raises(errors.BadRequest, match="policy"):
        run(client, [W("a", 10)], policy="magic")
    after = client.stats()["services"]
    for w in ("work@0", "work@1"):  # not one task was dispatched
        assert after[w]["requests"] == before[w]["requests"]


def test_dispatch_streams_decisions_and_logs_them_in_the_kernel(client, kern, tmp_path):
    tasks = [W("a", 60), W("b", 60, ["a"]), W("c", 60, ["a"]), W("d", 60, ["b", "c"])]
    partials = []
    out = run(client, tasks, partials)
    assert out["states"] == {"done": 4} and out["failed"] == []
    for tid in "abcd":
        assert len(evs(out, "dispatch", tid)) == 1 and len(evs(out, "done", tid)) == 1
    # b and c ran side by side on the two workers, after a and before d
    t = {e["task"]: e["t"] for e in evs(out, "start")}
    done = {e["task"]: e["t"] for e in evs(out, "done")}
    assert done["a"] <= min(t["b"], t["c"]) and max(done["b"], done["c"]) <= t["d"]
    assert {e["worker"] for e in evs(out, "start") if e["task"] in "bc"} == {"work@0", "work@1"}
    streamed = [d for p in partials for d in p["decisions"]]
    assert streamed == out["events"][:len(streamed)] and len(streamed) >= len(out["events"]) - 2
    assert all("critical_path" in p and p["eta_makespan_s"] >= 0 for p in partials)
    # the decision log holds the same events, and the Gantt chart is drawn from the log alone
    logged = gantt.events_from_log(kern.decision_log)
    assert logged == out["events"]
    segs = gantt.segments(logged)
    assert sorted(s["task"] for s in segs if s["kind"] == "run") == list("abcd")
    png = gantt.draw(logged, str(tmp_path / "run.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_re_estimates_and_the_critical_path_moves(client):
    # Estimated alike, branch x is four times longer than its estimate; only progress shows it.
    tasks = [W("x1", 1200, eta=0.3), W("x2", 300, ["x1"]), W("y1", 300), W("y2", 300, ["y1"]),
             W("y3", 150, ["y2"])]
    partials = []
    out = run(client, tasks, partials, tick_ms=50)
    assert out["states"] == {"done": 5}
    paths = [p["critical_path"] for p in partials if p["critical_path"]]
    assert paths[0][0] == "y1"
    assert any(p[:2] == ["x1", "x2"] for p in paths)
    first_x = next(i for i, p in enumerate(paths) if p[0] == "x1")
    assert all(p[0] != "y1" for p in paths[first_x:])


def test_off_path_work_is_preempted_through_the_kernel(client, kern):
    # a fans out into two equal chains; x, off the path with slack, holds the second worker
    tasks = [W("a", 100), W("x", 1000), W("c1", 600, ["a"]), W("e1", 600, ["c1"]), W("c2", 600, ["a"]),
             W("e2", 600, ["c2"])]
    # No margins: x is preempted as soon as its remaining run plus c2's fits under c2's rank
    # (x has run 0.5 s) and while c2 would still wait 50 ms for it: a window of half a second.
    out = run(client, tasks, tick_ms=50, params={"rank_margin": 0.0, "min_wait_frac": 0.0, "min_wait_s": 0.05})
    assert out["states"] == {"done": 6}
    (pre,) = evs(out, "preempt", "x")
    assert pre["for_task"] in ("c1", "c2")
    # the worker really paused x at a safe point, and later continued it on the same worker
    assert len(evs(out, "paused", "x")) == 1 and len(evs(out, "resumed", "x")) == 1
    (xstart,) = evs(out, "start", "x")
    assert evs(out, "resume", "x")[0]["worker"] == xstart["worker"]
    assert evs(out, "paused", "x")[0]["t"] < evs(out, "resumed", "x")[0]["t"] < evs(out, "done", "x")[0]["t"]
    assert not evs(out, "order_failed")
    # the orders went through the kernel: its own log records the preempt and resume it published
    ops = [r["op"] for r in log_lines(kern)]
    assert "preempt" in ops and "resume" in ops
    # and so did the OS priorities: off-path hosts reniced and confined to fewer CPUs
    assert "proc.nice" in ops and (len(os.sched_getaffinity(0)) < 2 or "proc.affinity" in ops)
    assert out["preemptions"] == 1


def test_a_killed_worker_s_task_is_rerun_elsewhere(client, kern):
    tasks = [W("long", 1500), W("after", 100, ["long"])]
    killed = {}

    def on_partial(reply):
        for e in reply.payload["decisions"]:
            if e["ev"] == "start" and e["task"] == "long" and not killed:
                pid = next(w["pid"] for w in client.stats()["workers"] if w["service"] == e["worker"])
                os.kill(pid, signal.SIGKILL)
                killed.update(worker=e["worker"], pid=pid)

    out = client.call("cpcs", {"dag": {"tasks": tasks}}, on_partial=on_partial, timeout=WAIT_S)
    assert killed and out["states"] == {"done": 2}
    (lost,) = evs(out, "lost", "long")
    assert lost["worker"] == killed["worker"] and lost["code"] == "worker_died"
    dispatches = evs(out, "dispatch", "long")
    assert len(dispatches) == 2 and [d["attempt"] for d in dispatches] == [1, 1]  # not counted as a failure
    assert evs(out, "done", "long")[0]["t"] > lost["t"]


def test_a_straggling_attempt_is_cancelled_and_run_again(client, kern):
    # k teaches the scheduler what a task of kind 'k' takes; s's first attempt runs 30x slower
    # (12 s): its progress rate gives it away, it is cancelled through the kernel and re-run
    k = W("k", 200, kind="k")
    s = W("s", 400, kind="k")
    s["payload"] = {"ms": 400, "steps": 20, "attempts": [{"slow": 30.0}, {}]}
    out = run(client, [k, s, W("after", 100, ["s"])], tick_ms=50, params={"restart_min_seen": 1})
    assert out["states"] == {"done": 3} and not out["failed"]
    (restart,) = evs(out, "restart", "s")
    assert restart["attempt"] == 1 and restart["rest_s"] > restart["fresh_s"]
    (done,) = evs(out, "done", "s")
    assert done["attempt"] == 2  # the second attempt's outcome counted; the first one's never did
    assert len(evs(out, "start", "s")) == 2
    # the late replies of the abandoned attempt changed nothing: 'after' ran once, after s
    assert evs(out, "start", "after")[0]["t"] >= done["t"]
    assert "cancel" in [r["op"] for r in log_lines(kern)]
