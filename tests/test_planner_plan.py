"""The planner's pure parts: plans and revisions, the scripted planner, the workloads, the
independent verifier (no kernel)."""

from __future__ import annotations

import pytest

from lm import chains
from planner import tasks
from planner import verify as V
from planner.plan import Plan, PlanError, Revision, Step
from planner.scripted import LMPlanner, ScriptedPlanner


def _plan() -> Plan:
    return Plan(
        "t",
        [
            Step("a", "tool", {}, est_cpu_s=1.0),
            Step("b", "tool", {}, est_cpu_s=2.0, lazy=True),
            Step("c", "decode", {}, deps=("a",), est_tokens=30),
            Step("answer", "answer", {}, deps=("b", "c")),
        ],
    )


def test_plan_consumers_needed_and_orders():
    p = _plan()
    assert p.steps["a"].consumers == ("c",) and p.steps["c"].consumers == ("answer",)
    assert p.needed() == {"a", "b", "c", "answer"}
    order = p.order()
    assert order.index("a") < order.index("c") < order.index("answer")
    heft = p.heft_order()
    assert heft.index("a") < heft.index("c") and heft[-1] == "answer"
    assert p.upward_rank()["a"] == pytest.approx(1.0) and p.upward_rank()["b"] == pytest.approx(2.0)
    assert p.est_total() == (pytest.approx(3.0), 30)


def test_revisions_drop_replace_add():
    p = _plan()
    p.apply(Revision("drop", "b", "not needed"), 1.0)
    assert p.steps["b"].dropped and "b" not in p.answer.deps and "b" not in p.needed()
    p.apply(Revision("replace", "a", "better tool", Step("a2", "tool", {}, est_cpu_s=0.5)), 2.0)
    assert p.steps["c"].deps == ("a2",) and p.steps["a"].dropped and p.steps["a2"].consumers == ("c",)
    p.apply(Revision("add", "fix", "check failed", Step("fix", "repair", {}, deps=("c",)), feeds=("answer",)), 3.0)
    assert "fix" in p.answer.deps and p.needed() == {"a2", "c", "fix", "answer"}
    assert [r.action for _, r in p.revisions] == ["drop", "replace", "add"]


def test_bad_plans_and_revisions_are_refused_whole():
    with pytest.raises(PlanError, match="cycle"):
        Plan(
            "t",
            [
                Step("a", "tool", {}, deps=("b",)),
                Step("b", "tool", {}, deps=("a",)),
                Step("answer", "answer", {}, deps=("a",)),
            ],
        )
    with pytest.raises(PlanError, match="answer"):
        Plan("t", [Step("a", "tool", {})])
    with pytest.raises(PlanError, match="unknown kind"):
        Step("x", "magic", {})
    p = _plan()
    with pytest.raises(PlanError):
        p.apply(Revision("drop", "answer", "no"), 0.0)
    with pytest.raises(PlanError):  # would make a cycle: nothing changes
        p.apply(Revision("add", "z", "loop", Step("z", "tool", {}, deps=("answer",)), feeds=("a",)), 0.0)
    assert "z" not in p.steps and p.steps["a"].deps == () and not p.revisions
    with pytest.raises(PlanError):
        p.apply(Revision("drop", "nope", "unknown"), 0.0)


def test_workloads_are_seeded_and_split_by_group():
    for fam in tasks.FAMILIES:
        a, b = tasks.generate(fam, 5, 4, 3), tasks.generate(fam, 5, 4, 3)
        assert a == b and len(a) == 12
        assert a != tasks.generate(fam, 6, 4, 3)
        train, held = tasks.split(a)
        assert train and held and not {t.group for t in train} & {t.group for t in held}
    with pytest.raises(ValueError):
        tasks.generate("chemistry", 1, 1)
    math = tasks.generate("math", 5, 2, 4)
    texts = [sg["expr"] for t in math for sg in t.spec["subgoals"]]
    assert len(set(texts)) < len(texts) or len({t.group for t in math}) == 2  # related problems recur


def test_scripted_planner_changes_plans_on_results():
    task = next(t for t in tasks.generate("algo", 3, 4, 3) if t.spec["swap"] is not None)
    pl = ScriptedPlanner(seed=1)
    plan = pl.plan(task)
    assert plan.steps["if_sat"].lazy and plan.steps["if_unsat"].lazy and not plan.steps["probe"].lazy
    assert pl.plan(task).steps["probe"].est_cpu_s == plan.steps["probe"].est_cpu_s  # seeded
    for rev in pl.revise(plan, "probe", {"sat": True}):
        plan.apply(rev, 1.0)
    assert plan.steps["if_unsat"].dropped and plan.steps["if_sat"].dropped  # dropped, and replaced by swap
    assert plan.steps["swap"].spec["inputs"] == task.spec["swap"] and "swap" in plan.answer.deps
    revs = pl.revise(plan, "check", {"ok": False, "reason": "wrong"})
    assert [r.action for r in revs] == ["add"] and revs[0].new.kind == "repair"


def test_lm_planner_turns_thunks_into_lazy_steps():
    task = tasks.generate("math", 2, 1, 1)[0]
    items = [chains.Item(*it) for it in task.spec["items"]]
    written = chains.chain(items[:2], lazy=True)  # the model wrote two thunks and missed the third
    written = written.replace(chains.prompt(items[:2], lazy=True), chains.prompt(items, lazy=True))
    plan = LMPlanner(lambda _p: written).plan(task)
    kinds = {sid: s.kind for sid, s in plan.steps.items() if sid.startswith("item")}
    assert kinds == {"item0": "thunk", "item1": "thunk", "item2": "decode"}
    assert plan.steps["item0"].lazy and plan.steps["item0"].est_tokens > 0
    assert set(plan.steps["check"].deps) == {"item0", "item1", "item2"}


def test_verifier_is_strict():
    assert V.check_subgoal({"kind": "integrate", "expr": "3*t**2", "var": "t"}, "t**3 + 5")
    assert not V.check_subgoal({"kind": "integrate", "expr": "3*t**2", "var": "t"}, "t**3 + t")
    assert V.check_subgoal({"kind": "solve", "expr": "x**2 - 4 = 0", "var": "x"}, ["-2", "2"])
    assert not V.check_subgoal({"kind": "solve", "expr": "x**2 - 4 = 0", "var": "x"}, ["2"])
    assert not V.check_subgoal({"kind": "solve", "expr": "x**2 - 4 = 0", "var": "x"}, ["3", "-2"])
    assert not V.check_subgoal({"kind": "integrate", "expr": "x", "var": "x"}, "((")
    assert V.check_chain([[1, 2, 3], [4, 5, 6]], {"0": 7, "1": 34})
    assert not V.check_chain([[1, 2, 3], [4, 5, 6]], {"0": 7, "1": 35})
    inst = {"n_vars": 20, "ratio": 2.0, "seed": 3}
    assert V.is_sat(inst)
    import pycosat

    model = pycosat.solve(V.random_3sat(20, 2.0, 3))
    assert V.check_sat(inst, {"sat": True, "model": model})
    flipped = [-v for v in model]
    satisfies = all(
        any((lit > 0) == (abs(lit) in {v for v in flipped if v > 0}) for lit in cl) for cl in V.random_3sat(20, 2.0, 3)
    )
    assert V.check_sat(inst, {"sat": True, "model": flipped}) == satisfies
    assert not V.check_sat(inst, {"sat": True, "model": "all true"})
    assert not V.check_sat(inst, {"sat": False})
    assert not V.verify(tasks.generate("algo", 1, 1, 1)[0], "not a dict", tol=1.0)


def test_verifier_sat_generator_matches_the_tool():
    from services.ttc.tools import random_3sat  # the definition the tool runs (the verifier keeps its own copy)

    assert V.random_3sat(60, 4.26, 12345) == random_3sat(60, 4.26, 12345)


def test_calibration_uses_training_tasks_only(monkeypatch):
    from planner import calibrate as C

    train = [t for t in tasks.generate("physics", 4, 3, 2)][:4]
    # (error at level 0, 1, 2) and the surrogate's ROI per task: two escalations pay, two do not
    errs = {
        train[0].id: (0.05, 0.02, 0.008),
        train[1].id: (0.002, 0.001, 0.0005),
        train[2].id: (0.03, 0.01, 0.004),
        train[3].id: (0.004, 0.002, 0.001),
    }
    rois = {train[0].id: 0.09, train[1].id: 0.004, train[2].id: 0.05, train[3].id: 0.006}
    monkeypatch.setattr(C.V, "level_errors", lambda t: errs[t.id])
    monkeypatch.setattr(C, "predicted_roi_per_m", lambda t: rois[t.id])
    cal = C.calibrate(train)
    assert cal.tol == pytest.approx(1.25 * 0.008)
    # the least escalating cut that keeps every training answer right: only the two that pay
    assert cal.threshold == pytest.approx(0.05) and cal.train_escalations == 2 and cal.train_accuracy == 1.0
    with pytest.raises(ValueError):
        C.calibrate([t for t in tasks.generate("math", 1, 1, 1)])


def test_agent_markdown_reports_medians_spreads_and_the_paired_ablation():
    from bench import _report
    from bench._common import Result
    from bench.agent import markdown

    def result(reca_cpu: float, no_cpcs_cpu: float) -> Result:
        m: dict[str, float] = {}
        for mode, cpu in (("pic", 10.0), ("reca", reca_cpu), ("reca-no-cpcs", no_cpcs_cpu)):
            for k in ("cpu_s", "wall_s", "accuracy", "tokens", "flops", "duplicated", "orphaned"):
                m[f"{mode}.all.{k}"] = cpu if k == "cpu_s" else 1.0
            for fam in tasks.FAMILIES:
                m[f"{mode}.{fam}.cpu_s"], m[f"{mode}.{fam}.accuracy"] = cpu / 3, 1.0
            m[f"{mode}.cpu_by.ttc"] = cpu / 2
        m["reca_vs_pic.cpu_saving"] = 1 - reca_cpu / 10.0
        m["ablation.cpcs.cpu_s"] = no_cpcs_cpu - reca_cpu
        m["ablation.cpcs.share_of_pic_cpu"] = (no_cpcs_cpu - reca_cpu) / 10.0
        m["ablation.cpcs.accuracy_delta"] = 0.0
        m["ablation.cpcs.cpu_by.ttc"] = (no_cpcs_cpu - reca_cpu) / 2
        rows = [{"mode": mo, "family": "math", "cpu_s": 1.0} for mo in ("pic", "reca", "reca-no-cpcs")]
        return Result(metrics=m, targets={"reca_vs_pic.cpu_saving": (">=", 0.3)}, table=rows)

    # the paired difference per run (1, 2, 3) has median 2; the difference of the medians would be 1
    runs = [result(6.0, 7.0), result(7.0, 9.0), result(8.0, 11.0)]
    doc = _report.aggregate("agent", False, runs, _report.environment(), 1.0)
    text = markdown(doc)
    assert "| `reca_vs_pic.cpu_saving` | 0.3 [0.2, 0.4] | >= 0.3 | yes |" in text
    assert "| reca | 7 [6, 8] |" in text
    assert "| cpcs | 2 [1, 3] |" in text and "ttc +1.00" in text
