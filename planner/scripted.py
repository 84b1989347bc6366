"""Planners: a scripted, seeded one, and one driven by the project's own language model.

A planner turns a task into a :class:`~planner.plan.Plan` and revises it as results arrive.  It
only *suggests*: the executor of each mode decides what runs.  Estimates carry seeded noise (a
planner's guesses are not exact).

Plans, per family:

* ``math``: ``sg0``, ``sg1`` symbolic subgoals; ``chain`` a decode of the arithmetic chain;
  ``check`` its verification; ``answer``.  A failed check adds ``fix`` (a repair of the chain).
* ``algo``: ``probe`` (a small SAT call); ``if_sat`` and ``if_unsat``, the heavy SAT calls of
  both outcomes, suggested at once and marked lazy (only one will be needed); ``chain``,
  ``check``, ``answer``.  The probe's result drops the branch not taken, and on ``swap`` tasks the
  taken branch is replaced by another instance (``swap``).
* ``physics``: ``base`` (the coarse run), ``esc`` (the what-if escalation to the finer level),
  ``answer``.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Protocol

from lm import chains, thunks
from planner.plan import Plan, Revision, Step
from planner.tasks import Task

#: The planner's priors (CPU seconds, tokens) per step kind.
PRIOR_CPU = {"symbolic": 0.4, "tool_probe": 0.15, "tool": 0.6, "sim": 0.1, "whatif": 0.5}
TOKENS_PER_ITEM = 22


class Planner(Protocol):
    name: str

    def plan(self, task: Task) -> Plan: ...

    def revise(self, plan: Plan, step: str, result: Any) -> list[Revision]: ...


class ScriptedPlanner:
    """A seeded planner: the same task and seed give the same plan and revisions."""

    name = "scripted"

    def __init__(self, seed: int = 0, noise: float = 0.3) -> None:
        self.seed = seed
        self.noise = noise

    def _est(self, task: Task, key: str, prior: float) -> float:
        rng = random.Random(f"{self.seed}:{task.id}:{key}")
        return prior * math.exp(rng.gauss(0.0, self.noise))

    def chain_steps(self, task: Task) -> list[Step]:
        items = task.spec["items"]
        return [
            Step(
                "chain",
                "decode",
                {"items": items},
                est_tokens=int(self._est(task, "chain", TOKENS_PER_ITEM * len(items) + 10)),
            ),
            Step("check", "verify", {"of": "chain"}, deps=("chain",)),
        ]

    def plan(self, task: Task) -> Plan:
        s = task.spec
        if task.family == "math":
            steps = [
                Step(f"sg{i}", "symbolic", {"subgoal": sg}, est_cpu_s=self._est(task, f"sg{i}", PRIOR_CPU["symbolic"]))
                for i, sg in enumerate(s["subgoals"])
            ]
            steps += self.chain_steps(task)
            steps.append(Step("answer", "answer", {}, deps=(*(f"sg{i}" for i in range(len(s["subgoals"]))), "check")))
        elif task.family == "algo":
            steps = [
                Step(
                    "probe",
                    "tool",
                    {"tool": "sat", "inputs": s["probe"], "swap": s.get("swap")},
                    est_cpu_s=self._est(task, "probe", PRIOR_CPU["tool_probe"]),
                ),
                Step(
                    "if_sat",
                    "tool",
                    {"tool": "sat", "inputs": s["if_sat"], "when": True},
                    lazy=True,
                    est_cpu_s=self._est(task, "if_sat", PRIOR_CPU["tool"]),
                ),
                Step(
                    "if_unsat",
                    "tool",
                    {"tool": "sat", "inputs": s["if_unsat"], "when": False},
                    lazy=True,
                    est_cpu_s=self._est(task, "if_unsat", PRIOR_CPU["tool"]),
                ),
            ]
            steps += self.chain_steps(task)
            steps.append(Step("answer", "answer", {}, deps=("probe", "if_sat", "if_unsat", "check")))
        elif task.family == "physics":
            steps = [
                Step("base", "sim", {"level": s["from_level"]}, est_cpu_s=self._est(task, "base", PRIOR_CPU["sim"])),
                Step(
                    "esc",
                    "whatif",
                    {"from_level": s["from_level"], "to_level": s["to_level"]},
                    lazy=True,
                    est_cpu_s=self._est(task, "esc", PRIOR_CPU["whatif"]),
                ),
                Step("answer", "answer", {}, deps=("base", "esc")),
            ]
        else:
            raise ValueError(f"unknown family {task.family!r}")
        return Plan(task.id, steps)

    def revise(self, plan: Plan, step: str, result: Any) -> list[Revision]:
        """Revisions after ``step`` produced ``result`` (nothing for most steps)."""
        spec = plan.steps[step].spec
        out: list[Revision] = []
        if step == "probe" and isinstance(result, dict) and "sat" in result:
            for sid in ("if_sat", "if_unsat"):
                s = plan.steps.get(sid)
                if s is not None and not s.dropped and s.spec["when"] != result["sat"]:
                    out.append(Revision("drop", sid, f"the probe is {'SAT' if result['sat'] else 'UNSAT'}"))
            swap = spec.get("swap")
            taken = "if_sat" if result["sat"] else "if_unsat"
            if swap is not None and not plan.steps[taken].dropped:
                out.append(
                    Revision(
                        "replace",
                        taken,
                        "the probe's model calls for another instance",
                        Step(
                            "swap",
                            "tool",
                            {"tool": "sat", "inputs": swap},
                            lazy=True,
                            est_cpu_s=plan.steps[taken].est_cpu_s,
                        ),
                    )
                )
        elif (
            plan.steps[step].kind == "verify"
            and isinstance(result, dict)
            and result.get("ok") is False
            and "fix" not in plan.steps
        ):
            of = [spec["of"]] if spec["of"] in plan.steps else list(plan.steps[step].deps)
            out.append(
                Revision(
                    "add",
                    "fix",
                    f"check of {spec['of']} failed: {result.get('reason', '')}",
                    Step(
                        "fix",
                        "repair",
                        {"of": spec["of"]},
                        deps=tuple(of),
                        est_tokens=sum(plan.steps[d].est_tokens for d in of),
                    ),
                    feeds=("answer",),
                )
            )
        return out


class LMPlanner(ScriptedPlanner):
    """The project's own language model writes the chain part of the plan.

    ``lazy_chain(prompt) -> text`` asks the model (through the kernel's decode service, charged to
    the task's job) for the lazy form of the task's chain (``L:...;``); every thunk
    ``⟦ev(a+b*c)⟧`` it writes becomes a lazy ``thunk`` step with the thunk's own cost estimate,
    and the steps are listed in the order the model wrote them.  An item the model did not write
    as a thunk becomes an ordinary decode step of that item.  Tool and simulation steps come from
    the scripted plan (the model knows only arithmetic)."""

    name = "lm"

    def __init__(self, lazy_chain: Callable[[str], str], seed: int = 0, noise: float = 0.3) -> None:
        super().__init__(seed, noise)
        self.lazy_chain = lazy_chain

    def chain_steps(self, task: Task) -> list[Step]:
        items = [chains.Item(*it) for it in task.spec["items"]]
        text = self.lazy_chain(chains.prompt(items, lazy=True))
        written = {}
        for th in thunks.find_thunks(text):
            for i, it in enumerate(items):
                if th.args == it.expr and i not in written:
                    written[i] = thunks.estimate_cost(th.name, th.args)
                    break
        steps = []
        order = sorted(written) + [i for i in range(len(items)) if i not in written]
        for i in order:
            it = items[i]
            if i in written:
                steps.append(
                    Step(
                        f"item{i}", "thunk", {"item": [it.a, it.b, it.c], "index": i}, lazy=True, est_tokens=written[i]
                    )
                )
            else:
                steps.append(
                    Step(f"item{i}", "decode", {"items": [[it.a, it.b, it.c]], "index": i}, est_tokens=TOKENS_PER_ITEM)
                )
        steps.append(Step("check", "verify", {"of": "items"}, deps=tuple(s.id for s in steps)))
        return steps
