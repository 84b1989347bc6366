"""CPCS without sockets: DAG validation, the policies, re-estimation, preemption, retries and
recovery, driven with a fake clock (services.cpcs.logic.Scheduler / simulate)."""

from __future__ import annotations

import math
import statistics

import pytest

from bench._dags import layered, lower_bound
from services.cpcs.dag import DagError, dag_doc, parse_dag
from services.cpcs.logic import Params, Scheduler, St, Truth, Worker, simulate


def T(tid, eta, deps=(), **kw):
    return {"id": tid, "service": "work", "eta_s": eta, "deps": list(deps), **kw}


def dag(*tasks, resources=None):
    return parse_dag({"tasks": list(tasks), "resources": resources or {}})


def workers(n, hold=2):
    return [Worker(f"work@{i}", "work", child=f"work#{i}", hold=hold) for i in range(n)]


# -- validation: typed errors before anything runs ------------------------------------------------

@pytest.mark.parametrize("doc, reason", [
    ({"tasks": [T("a", 1, ["b"]), T("b", 1, ["a"])]}, "cycle"),
    ({"tasks": [T("a", 1, ["a"])]}, "cycle"),
    ({"tasks": [T("a", 1, ["zz"])]}, "unknown_dep"),
    ({"tasks": [T("a", 1), T("a", 2)]}, "duplicate"),
    ({"tasks": [T("a", -1)]}, "range"),
    ({"tasks": [T("a", 0)]}, "range"),
    ({"tasks": [T("a", float("nan"))]}, "non_finite"),
    ({"tasks": [T("a", float("inf"))]}, "non_finite"),
    ({"tasks": [T("a", True)]}, "type"),
    ({"tasks": [T("a", 1, p_success=0)]}, "range"),
    ({"tasks": [T("a", 1, p_success=1.5)]}, "range"),
    ({"tasks": [T("a", 1, needs={"gpu": 2})], "resources": {"gpu": 1}}, "never_fits"),
    ({"tasks": [T("a", 1, needs={"gpu": 1})]}, "unknown_resource"),
    ({"tasks": [T("a", 1, fallback={"service": "w", "eta_s": 1, "deps": ["x"]})]}, "type"),
    ({"tasks": []}, "type"),
    ({"tasks": "nope"}, "type"),
    ("nope", "type"),
])
def test_bad_dags_are_typed_errors(doc, reason):
    with pytest.raises(DagError) as info:
        parse_dag(doc)
    assert info.value.code == "bad_request"
    assert info.value.detail["reason"] == reason


def test_cycle_error_names_the_cycle():
    with pytest.raises(DagError) as info:
        parse_dag({"tasks": [T("a", 1, ["c"]), T("b", 1, ["a"]), T("c", 1, ["b"])]})
    assert set(info.value.detail["cycle"]) >= {"a", "b", "c"}


def test_doc_round_trip():
    d = dag(T("a", 1), T("b", 2, ["a"], p_success=0.5, fallback={"service": "other", "eta_s": 3}))
    again = parse_dag(dag_doc(d))
    assert again.tasks == d.tasks and again.services() == {"work", "other"}


# -- policies ---------------------------------------------------------------------------------------

def test_fifo_follows_the_planner_and_heft_the_rank():
    # The planner lists the short dead end first; the long chain's head has the larger rank.
    d = dag(T("short", 0.1), T("head", 0.1), T("tail", 5.0, ["head"]))
    fifo = Scheduler(d, workers(1, hold=1), 0.0, policy="fifo").tick(0.0)
    heft = Scheduler(d, workers(1, hold=1), 0.0, policy="heft").tick(0.0)
    cpcs = Scheduler(d, workers(1), 0.0, policy="cpcs").tick(0.0)
    assert [a.task for a in fifo if a.op == "dispatch"] == ["short"]
    assert [a.task for a in heft if a.op == "dispatch"] == ["head"]
    assert [a.task for a in cpcs if a.op == "dispatch"] == ["head"]


def test_dispatch_only_when_deps_done_and_resources_fit():
    d = dag(T("a", 1, needs={"gpu": 1}), T("b", 1, needs={"gpu": 1}), T("c", 1, ["a"]), resources={"gpu": 1})
    s = Scheduler(d, workers(3), 0.0)
    first = [a.task for a in s.tick(0.0) if a.op == "dispatch"]
    assert len(first) == 1 and first[0] in ("a", "b")  # one gpu: one of them
    s.on_started(first[0], 0.0)
    s.on_finished(first[0], 1.0, ok=True)
    second = [a.task for a in s.tick(1.0) if a.op == "dispatch"]
    assert ("b" in second) == (first[0] == "a") and ("c" in second) == (first[0] == "a")


# -- re-estimation ------------------------------------------------------------------------------

def test_progress_re_estimates_and_moves_the_critical_path():
    # Two branches estimated alike; branch x turns out 4x longer once it reports progress.
    d = dag(T("x1", 1.0), T("x2", 1.0, ["x1"]), T("y1", 1.0), T("y2", 1.0, ["y1"]), T("y3", 0.5, ["y2"]))
    s = Scheduler(d, workers(2), 0.0)
    s.tick(0.0)
    assert s.critical[0] == "y1"  # y has the longer estimated path
    for tid in ("x1", "y1"):
        s.on_started(tid, 0.0)
    s.on_progress("x1", 0.1, 0.4)  # 10 % in 0.4 s: x1 takes 4 s
    s.on_progress("y1", 0.4, 0.4)  # on estimate
    s.tick(0.4)
    assert s.eta_estimate(s.tasks["x1"], 0.4) == pytest.approx(4.0)
    assert s.critical == ("x1", "x2")
    # the unstarted x2 has the same kind ("work") as the 4x-slow x1, but kinds learn only from
    # finished tasks; once x1 finishes, the kind's factor raises every unstarted estimate.
    s.on_finished("x1", 4.0, ok=True)
    assert s.kind_factor("work") > 1.5
    assert s.eta_estimate(s.tasks["x2"], 4.0) > 1.5


def test_success_probability_learns_from_outcomes_and_hints():
    d = dag(T("a", 1.0, p_success=0.9, kind="k", max_attempts=5), T("b", 1.0, p_success=0.9, kind="k"))
    s = Scheduler(d, workers(2), 0.0)
    s.tick(0.0)
    p0 = s.p_estimate(s.tasks["b"])
    for i in range(3):
        s.on_started("a", float(i))
        s.on_finished("a", i + 0.5, ok=False, code="service_error")
        s.tick(i + 0.5)
    assert s.p_estimate(s.tasks["b"]) < p0 - 0.2
    assert s.remaining_own(s.tasks["b"], 3.0) > 1.0 / p0  # expected attempts grew
    s.on_started("b", 3.0)
    s.on_progress("b", 0.5, 3.5, p_hint=0.99)  # a verifier vouches for this attempt
    assert s.p_estimate(s.tasks["b"]) == 0.99


# -- preemption ----------------------------------------------------------------------------------

def _two_chains():
    # a fans out into two equal chains; x is off-path work with slack
    return dag(T("a", 0.1), T("x", 0.6), T("c1", 1.0, ["a"]), T("e1", 1.0, ["c1"]),
               T("c2", 1.0, ["a"]), T("e2", 1.0, ["c2"]))


def test_off_path_work_is_preempted_for_critical_work_and_resumed_later():
    s = Scheduler(_two_chains(), workers(2), 0.0)
    acts = s.tick(0.0)
    placed = {a.task: a.worker for a in acts if a.op == "dispatch"}
    assert set(placed) == {"a", "x"}
    for tid in placed:
        s.on_started(tid, 0.0, token=tid.encode())
    s.on_progress("x", 0.1, 0.06)
    s.on_finished("a", 0.1, ok=True)
    acts = s.tick(0.1)
    ops = [(a.op, a.task, a.worker) for a in acts if a.op != "nice"]
    assert ("preempt", "x", placed["x"]) in ops
    assert ("dispatch", "c2", placed["x"]) in ops or ("dispatch", "c1", placed["x"]) in ops
    assert "x" not in s.critical
    for a in acts:
        if a.op == "dispatch":
            s.on_started(a.task, 0.11)
    s.on_paused("x", 0.12)
    assert s.tasks["x"].st is St.PAUSED
    # the chains finish; x's worker then resumes it (not some other worker)
    now = 0.12
    while not s.finished and now < 10:
        now += 0.05
        for a in s.tick(now):
            if a.op == "dispatch":
                s.on_started(a.task, now)
            elif a.op == "resume":
                assert a.task == "x" and a.worker == placed["x"]
                s.on_resumed("x", now)
        for tid, t in s.tasks.items():
            if t.st is St.RUNNING and t.running_s(now) >= s.dag.tasks[tid].eta_s - 1e-9:
                s.on_finished(tid, now, ok=True)
    assert any(e["ev"] == "resume" and e["task"] == "x" for e in s.events)
    assert s.preemptions == 1


def test_work_without_slack_is_not_preempted():
    d = dag(T("a", 0.1), T("x", 3.0), T("c1", 1.0, ["a"]), T("c2", 1.0, ["a"]))
    s = Scheduler(d, workers(2), 0.0)
    for a in s.tick(0.0):
        if a.op == "dispatch":
            s.on_started(a.task, 0.0, token=a.task.encode())
    s.on_finished("a", 0.1, ok=True)
    assert not [a for a in s.tick(0.1) if a.op == "preempt"]  # x is the critical path itself


def test_a_task_without_a_kernel_token_is_not_preempted():
    s = Scheduler(_two_chains(), workers(2), 0.0)
    for a in s.tick(0.0):
        if a.op == "dispatch":
            s.on_started(a.task, 0.0)  # a service that does not report its token
    s.on_progress("x", 0.1, 0.06)
    s.on_finished("a", 0.1, ok=True)
    assert not [a for a in s.tick(0.1) if a.op == "preempt"]


def test_peers_never_preempt():
    for policy in ("fifo", "heft"):
        s = Scheduler(_two_chains(), workers(2, hold=1), 0.0, policy=policy)
        for a in s.tick(0.0):
            if a.op == "dispatch":
                s.on_started(a.task, 0.0)
        s.on_finished("a", 0.1, ok=True)
        assert not [a for a in s.tick(0.1) if a.op in ("preempt", "nice")]


def test_critical_hosts_are_reniced_first():
    s = Scheduler(_two_chains(), workers(2), 0.0)
    acts = s.tick(0.0)
    nice = {a.worker: a.nice for a in acts if a.op == "nice"}
    host = next(a.worker for a in acts if a.op == "dispatch" and a.task == "a")
    # every worker starts at nice 0: only the one not hosting critical work is lowered
    assert host not in nice and list(nice.values()) == [Params().nice_other]
    s = Scheduler(_two_chains(), workers(2), 0.0, params=Params(all_cpus=(0, 1), off_path_cpus=(1,)))
    acts = s.tick(0.0)
    cpus = {a.worker: a.cpus for a in acts if a.op == "affinity"}
    host = next(a.worker for a in acts if a.op == "dispatch" and a.task == "a")
    assert cpus[host] == (0, 1) and [v for w, v in cpus.items() if w != host] == [(1,)]


# -- failures ------------------------------------------------------------------------------------

def test_retry_then_fallback_then_give_up_cancels_the_branch():
    d = dag(T("a", 1.0, max_attempts=2, fallback={"service": "work", "eta_s": 2.0, "max_attempts": 2}), T("b", 1.0, ["a"]),
            T("c", 1.0))
    s = Scheduler(d, workers(2), 0.0)
    now = 0.0
    outcomes = []
    for _ in range(4):  # two attempts, the fallback's two attempts
        acts = [a for a in s.tick(now) if a.op == "dispatch" and a.task == "a"]
        assert len(acts) == 1
        outcomes.append(acts[0].attempt)
        s.on_started("a", now)
        now += 1.0
        s.on_finished("a", now, ok=False, code="service_error")
    assert outcomes == [1, 2, 1, 2]
    assert s.tasks["a"].st is St.FAILED and s.tasks["b"].st is St.CANCELLED
    evs = [e["ev"] for e in s.events if e.get("task") == "a"]
    assert evs.count("retry") == 2 and evs.count("replan") == 1 and evs[-1] == "gave_up"


def test_lost_worker_reruns_the_attempt_elsewhere_without_counting():
    d = dag(T("a", 1.0, max_attempts=1))
    s = Scheduler(d, workers(2), 0.0)
    (first,) = [a for a in s.tick(0.0) if a.op == "dispatch"]
    s.on_started("a", 0.0)
    s.on_finished("a", 0.5, ok=False, code="worker_died", infra=True)
    assert s.tasks["a"].st is St.READY and not s.workers[first.worker].alive
    (second,) = [a for a in s.tick(0.5) if a.op == "dispatch"]
    assert second.worker != first.worker and second.attempt == 1
    s.worker_up(first.worker)
    assert s.workers[first.worker].alive


# -- whole runs (simulated) ----------------------------------------------------------------------

def test_simulated_contention_cpcs_beats_fifo_and_stays_near_the_bound():
    ratios = {"fifo": [], "cpcs": []}
    for seed in range(4):
        d, truth = layered(seed, 4)
        for pol in ratios:
            s = simulate(d, truth, 4, policy=pol)
            assert all(t.st is St.DONE for t in s.tasks.values())
            makespan = max(t.finished_at for t in s.tasks.values())
            ratios[pol].append(makespan / lower_bound(d, truth, 4))
    assert statistics.mean(ratios["cpcs"]) < statistics.mean(ratios["fifo"])
    assert statistics.mean(ratios["cpcs"]) < 1.2 and min(ratios["cpcs"]) >= 1.0 - 1e-6


def test_simulated_failures_every_task_finishes_with_its_drawn_attempts():
    d, truth = layered(7, 4, fail=0.5)
    s = simulate(d, truth, 4, policy="cpcs")
    assert all(t.st is St.DONE for t in s.tasks.values())
    assert all(s.tasks[tid].attempt == tr.fail_attempts + 1 for tid, tr in truth.items())


def test_truth_dataclass_and_lower_bound():
    d = dag(T("a", 1.0), T("b", 1.0, ["a"]), T("c", 1.0))
    tr = {"a": Truth(1.0), "b": Truth(2.0, 1), "c": Truth(0.5)}
    assert lower_bound(d, tr, 1) == pytest.approx(1.0 + 4.0 + 0.5)
    assert lower_bound(d, tr, 8) == pytest.approx(5.0)
    assert math.isfinite(Scheduler(d, workers(1), 0.0).expected_makespan(0.0))


# -- stragglers ----------------------------------------------------------------------------------

def _straggler_setup():
    # k1 finishes first (teaching the scheduler what a 'k' task takes), then s runs slow
    d = dag(T("k1", 0.2, kind="k"), T("s", 0.2, kind="k"), T("after", 0.2, ["s"], kind="k"))
    s = Scheduler(d, workers(2), 0.0, params=Params(restart_min_seen=1))
    for a in s.tick(0.0):
        if a.op == "dispatch":
            s.on_started(a.task, 0.0, token=a.task.encode())
    s.on_finished("k1", 0.2, ok=True)
    return s


def test_a_straggling_attempt_is_restarted_once_its_rate_gives_it_away():
    s = _straggler_setup()
    s.on_progress("s", 0.05, 0.2)  # too little progress to judge: no restart yet
    assert not [a for a in s.tick(0.21) if a.op == "restart"]
    s.on_progress("s", 0.1, 0.4)  # 10 % in 0.4 s: the rest takes 3.6 s against a fresh 0.2 s
    acts = s.tick(0.4)
    restart = [a for a in acts if a.op == "restart"]
    assert [(a.task, a.attempt) for a in restart] == [("s", 1)]
    redo = [a for a in acts if a.op == "dispatch" and a.task == "s"]
    assert redo and redo[0].attempt == 2  # ready again and placed in the same tick: a new attempt
    s.on_started("s", 0.41, token=b"s2")
    s.on_progress("s", 0.1, 0.9)  # slow again: restarted at most max_restarts (1) times
    assert not [a for a in s.tick(0.9) if a.op == "restart"]
    assert s.tasks["s"].restarts == 1 and any(e["ev"] == "restart" for e in s.events)


def test_no_restart_before_a_task_of_its_kind_finished_nor_for_the_peers():
    d = dag(T("s", 0.2, kind="k"), T("x", 0.2, kind="k"))
    s = Scheduler(d, workers(2), 0.0)
    for a in s.tick(0.0):
        if a.op == "dispatch":
            s.on_started(a.task, 0.0, token=a.task.encode())
    s.on_progress("s", 0.1, 0.4)  # slow, but nothing of kind k has finished: underestimated or slow?
    assert not [a for a in s.tick(0.4) if a.op == "restart"]
    d3 = dag(T("k1", 0.2, kind="k"), T("s", 0.2, kind="k"))
    s3 = Scheduler(d3, workers(2), 0.0)  # the default judges a kind only after 3 of it finished
    for a in s3.tick(0.0):
        if a.op == "dispatch":
            s3.on_started(a.task, 0.0, token=a.task.encode())
    s3.on_finished("k1", 0.2, ok=True)
    s3.on_progress("s", 0.1, 0.4)
    assert not [a for a in s3.tick(0.4) if a.op == "restart"]
    h = _straggler_setup()
    h.params.restart_factor = 0.0  # switched off
    h.on_progress("s", 0.1, 0.4)
    assert not [a for a in h.tick(0.4) if a.op == "restart"]
    for policy in ("fifo", "heft"):
        p = Scheduler(parse_dag(dag_doc(h.dag)), workers(2, hold=1), 0.0, policy=policy)
        for a in p.tick(0.0):
            if a.op == "dispatch":
                p.on_started(a.task, 0.0, token=a.task.encode())
        p.on_finished("k1", 0.2, ok=True)
        p.on_progress("s", 0.1, 0.4)
        assert not [a for a in p.tick(0.4) if a.op == "restart"]


def test_a_long_task_of_a_kind_that_varies_is_not_restarted():
    # three 'k' tasks finished, the slowest at 4x its estimate: a task at 6x is within 2x of that
    d = dag(*(T(f"k{i}", 0.1, kind="k") for i in range(3)), T("s", 0.1, kind="k"))
    s = Scheduler(d, workers(4), 0.0)
    for a in s.tick(0.0):
        if a.op == "dispatch":
            s.on_started(a.task, 0.0, token=a.task.encode())
    for i, ran in enumerate((0.1, 0.15, 0.4)):
        s.on_finished(f"k{i}", ran, ok=True)
    s.on_progress("s", 0.1, 0.06)  # on course for 0.6 s
    assert not [a for a in s.tick(0.06) if a.op == "restart"]
    s.on_progress("s", 0.2, 0.2)  # now on course for 1.0 s: beyond 2x the slowest (0.8 s)
    assert [a.task for a in s.tick(0.2) if a.op == "restart"] == ["s"]


def test_simulated_stragglers_cpcs_restarts_and_beats_static_heft():
    spans = {"heft": [], "cpcs": []}
    for seed in range(3):
        d, truth = layered(500 + seed, 4, chain_s=0.3, light_s=0.075, straggle=0.15)
        assert any(tr.slow > 1 for tr in truth.values())
        for pol in spans:
            s = simulate(d, truth, 4, policy=pol)
            assert all(t.st is St.DONE for t in s.tasks.values())
            spans[pol].append(max(t.finished_at for t in s.tasks.values()) / lower_bound(d, truth, 4))
            if pol == "cpcs":
                assert any(e["ev"] == "restart" for e in s.events)
    assert statistics.mean(spans["cpcs"]) < statistics.mean(spans["heft"])
