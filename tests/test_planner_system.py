"""Every mode on a real ``python -m kernel`` with the services the workloads use: a small task of
each family, answers checked by the independent verifier, and what each mode did with the
plan's speculative branch read back from the services' own records."""

from __future__ import annotations

import dataclasses

import pytest

from planner import kernel as K
from planner import tasks
from planner import verify as V
from planner.run import run_batch
from tests.support import KernelProcess

#: One task per family: an algo task whose probe drops a branch, a math task, a physics task.
ALGO = next(t for t in tasks.generate("algo", 31, 2, 2) if t.spec["swap"] is None)
MATH = tasks.generate("math", 31, 1, 1)[0]
PHYS = tasks.generate("physics", 31, 3, 1)[2]  # gaussian diffusion: a cheap reference
TASKS = [ALGO, MATH, PHYS]


@pytest.fixture(scope="module")
def kern():
    k = KernelProcess.from_config(K.config(threshold=0.0))
    try:
        from clients import Client

        with Client(k.endpoint, timeout=30, retries=0) as c:
            for name in K.SERVICES:
                c.wait_for_service(name, 120)
        K.warm(k)
        yield k
    finally:
        k.stop()


@pytest.fixture(scope="module")
def tol():
    # any answer at the escalation's level passes; the coarse level does not (checked below)
    errs = V.level_errors(PHYS)
    assert errs[PHYS.spec["from_level"]] > 1.25 * errs[PHYS.spec["to_level"]]
    return 1.25 * errs[PHYS.spec["to_level"]]


@pytest.mark.parametrize("mode", ["pic", "strong", "llmseq", "reca"])
def test_mode_answers_and_heavy_runs(kern, tol, mode):
    batch = run_batch(kern.endpoint, kern.pid, mode, TASKS, tol=tol)
    runs = {r.task.family: r for r in batch.runs}
    assert batch.cpu_s > 0 and batch.wall_s > 0
    # the tool and symbolic parts are exact in every mode: the verifier accepts them
    algo = runs["algo"].answer
    assert algo["probe"] == V.is_sat(ALGO.spec["probe"])
    assert V.check_sat(V.needed_instance(ALGO), algo["branch"])
    for sg, ans in zip(MATH.spec["subgoals"], runs["math"].answer["subgoals"]):
        assert V.check_subgoal(sg, ans), (sg, ans)
    # every mode escalates this task (cswif's threshold is 0 here) and answers at the finer level
    assert runs["physics"].answer["level"] == PHYS.spec["to_level"]
    assert runs["physics"].correct
    f = batch.figures()
    dropped = "if_unsat" if V.is_sat(ALGO.spec["probe"]) else "if_sat"
    assert [r["action"] for r in runs["algo"].revisions if r["step"] == dropped] == ["drop"]
    if mode == "pic":  # started at once, never cancelled: it ran to its end for nobody
        assert f["orphaned"] >= 1
    if mode == "reca":
        assert f["duplicated"] == 0 and f["orphaned"] == 0 and f["overshoot"] <= 0
        assert runs["algo"].correct  # IDS splices exact steps: the chain is right by construction
        assert not any(h.step == dropped and h.ran for h in batch.heavy)  # prepared, aborted, never run
        assert runs["algo"].limits["tokens"] > 0 and runs["algo"].spent["tokens"] <= runs["algo"].limits["tokens"]
    if mode == "llmseq":  # one step at a time: the dropped branch never started
        assert not any(h.step == dropped for h in batch.heavy)


def test_agent_demo_narrates_from_the_services_records(kern):
    from planner import demo as agent_demo

    lines: list[str] = []
    out = agent_demo.run(kern.endpoint, kern.pid, out=lines.append)
    algo = out["algo"]
    assert out["correct"]
    dropped = [r["step"] for r in algo.revisions if r["action"] == "drop"]
    assert dropped and {a["step"] for a in algo.aborted} >= set(dropped)
    # ttc's own record: the dropped branch was aborted before any run
    assert all(a.get("state") == "ABORTED" and a.get("attempts", 0) == 0 for a in algo.aborted if a["step"] in dropped)
    assert algo.spent.get("tokens", 0) > 0
    assert any("ABORTED after 0 run(s)" in line for line in lines)
    assert any("CPU s (OS)" in line for line in lines)


def test_a_repeated_simulation_is_served_from_sims_cache_in_reca_and_strong_not_pic(kern, tol):
    twice = [PHYS, dataclasses.replace(PHYS, id=PHYS.id + "-again")]  # the same simulations
    for mode, dup in (("reca", 0), ("strong", 0), ("pic", 2)):
        batch = run_batch(kern.endpoint, kern.pid, mode, twice, tol=tol)
        f = batch.figures()
        assert all(r.correct for r in batch.runs)
        assert f["duplicated"] == dup, (mode, f)
        assert {"kernel", "sim", "client"} <= set(batch.cpu_by)  # CPU per part of the kernel's tree
        if mode != "pic":  # the second task's base and escalation: cache hits, nothing run
            assert not any(h.ran for h in batch.heavy if h.task.endswith("-again"))
    # pic asks without the cache: every run computed (sim's CPU is in its share)
    assert [h.ran for h in batch.heavy] == [True, True, True, True] and batch.cpu_by["sim"] > 0
