"""Plans: what a planner suggests.  A plan is a DAG of steps with estimated costs, consumers and
lazy thunks, revised as results arrive (steps dropped, replaced, added).

Pure data and logic: no sockets, no clock (times are passed in).  The executors
(:mod:`planner.execute`) decide what of a plan actually runs; in reca mode the runtime decides,
in the peer modes the planner's plan is executed as written.

Invariants (checked by :meth:`Plan.check`):

* the live steps (not dropped) form a DAG: every dependency names a live step, no cycle;
* exactly one step has kind ``answer``; it is never dropped;
* a step's ``consumers`` are the live steps that list it in their ``deps`` (kept by the plan,
  never set by a caller): a step nobody consumes, directly or through the answer, is not needed.
"""

from __future__ import annotations

import dataclasses
import graphlib
from typing import Any, Iterable

#: Step kinds.  ``decode``: the language model writes a derivation; ``tool``: a heavy tool call
#: (a SAT solve); ``symbolic``: a symbolic subgoal (integrate, solve, ...); ``sim``: a simulation
#: run; ``whatif``: an escalation of a simulation to a finer level; ``verify``: a check of an
#: earlier step; ``repair``: fix what a check flagged; ``thunk``: a lazy item of a chain, forced
#: only when a consumer demands it; ``answer``: the task's answer (the final consumer).
KINDS = ("decode", "tool", "symbolic", "sim", "whatif", "verify", "repair", "thunk", "answer")
#: Kinds whose runs are heavy (a process of their own or seconds of CPU): duplicates and orphans
#: of these are counted.
HEAVY = frozenset({"tool", "sim", "whatif", "symbolic"})


class PlanError(ValueError):
    """A plan or a revision that breaks an invariant (unknown step, cycle, second answer, ...)."""


@dataclasses.dataclass
class Step:
    """One step.  ``spec``: what to do, independent of who runs it (a subgoal, a tool's inputs, a
    prompt, a simulation).  ``est_cpu_s``/``est_tokens``: the planner's estimate of its cost.
    ``lazy``: a thunk, worth running only when a consumer demands it."""

    id: str
    kind: str
    spec: dict
    deps: tuple[str, ...] = ()
    est_cpu_s: float = 0.0
    est_tokens: int = 0
    lazy: bool = False
    dropped: bool = False
    consumers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"step {self.id!r}: unknown kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.est_cpu_s < 0 or self.est_tokens < 0:
            raise PlanError(f"step {self.id!r}: negative estimate")
        self.deps = tuple(self.deps)

    @property
    def heavy(self) -> bool:
        return self.kind in HEAVY


@dataclasses.dataclass(frozen=True)
class Revision:
    """A change of plan: ``drop`` a step, ``replace`` it by ``new`` (its consumers now depend on
    the new step), or ``add`` ``new`` (with ``feeds``: steps that now depend on it)."""

    action: str
    step: str
    reason: str
    new: Step | None = None
    feeds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in ("drop", "replace", "add"):
            raise PlanError(f"unknown revision {self.action!r}")
        if self.action in ("replace", "add") and self.new is None:
            raise PlanError(f"a {self.action} revision needs a new step")


class Plan:
    """A DAG of :class:`Step` for one task, with its revision history."""

    def __init__(self, task_id: str, steps: Iterable[Step]) -> None:
        self.task_id = task_id
        self.steps: dict[str, Step] = {}
        for s in steps:
            if s.id in self.steps:
                raise PlanError(f"duplicate step id {s.id!r}")
            self.steps[s.id] = s
        self.revisions: list[tuple[float, Revision]] = []
        self._relink()
        self.check()

    # -- queries ----------------------------------------------------------------------------------

    @property
    def answer(self) -> Step:
        return next(s for s in self.steps.values() if s.kind == "answer" and not s.dropped)

    def live(self) -> list[Step]:
        return [s for s in self.steps.values() if not s.dropped]

    def needed(self) -> set[str]:
        """Live steps the answer depends on, directly or transitively."""
        out: set[str] = set()
        todo = [self.answer.id]
        while todo:
            sid = todo.pop()
            if sid in out:
                continue
            out.add(sid)
            todo.extend(self.steps[sid].deps)
        return out

    def order(self) -> list[str]:
        """A topological order of the live steps (ties in listing order)."""
        ts = graphlib.TopologicalSorter({s.id: s.deps for s in self.live()})
        ts.prepare()
        index = {sid: i for i, sid in enumerate(self.steps)}
        out: list[str] = []
        while ts.is_active():
            ready = sorted(ts.get_ready(), key=index.__getitem__)
            out.extend(ready)
            ts.done(*ready)
        return out

    def upward_rank(self) -> dict[str, float]:
        """HEFT's upward rank on identical workers: a step's estimated CPU plus the longest
        estimated path through its consumers."""
        rank: dict[str, float] = {}
        for sid in reversed(self.order()):
            s = self.steps[sid]
            rank[sid] = s.est_cpu_s + max((rank[c] for c in s.consumers), default=0.0)
        return rank

    def heft_order(self) -> list[str]:
        """Live steps by decreasing upward rank (a valid topological order: a step's rank exceeds
        each consumer's when its estimate is positive; ties fall back to the topological order)."""
        rank = self.upward_rank()
        topo = {sid: i for i, sid in enumerate(self.order())}
        return sorted(topo, key=lambda sid: (-rank[sid], topo[sid]))

    def est_total(self) -> tuple[float, int]:
        """Estimated CPU seconds and tokens of every live step."""
        live = self.live()
        return sum(s.est_cpu_s for s in live), sum(s.est_tokens for s in live)

    # -- changes ----------------------------------------------------------------------------------

    def apply(self, rev: Revision, now: float) -> None:
        """Apply one revision (all or nothing)."""
        steps = {k: dataclasses.replace(v) for k, v in self.steps.items()}
        if rev.step not in steps and rev.action != "add":
            raise PlanError(f"revision of unknown step {rev.step!r}")
        if rev.action == "drop":
            if steps[rev.step].kind == "answer":
                raise PlanError("the answer step cannot be dropped")
            steps[rev.step].dropped = True
            for s in steps.values():
                s.deps = tuple(d for d in s.deps if d != rev.step)
        elif rev.action == "replace":
            assert rev.new is not None
            if rev.new.id in steps:
                raise PlanError(f"replacement id {rev.new.id!r} is taken")
            steps[rev.step].dropped = True
            steps[rev.new.id] = dataclasses.replace(rev.new)
            for s in steps.values():
                s.deps = tuple(rev.new.id if d == rev.step else d for d in s.deps)
        else:
            assert rev.new is not None
            if rev.new.id in steps:
                raise PlanError(f"added id {rev.new.id!r} is taken")
            steps[rev.new.id] = dataclasses.replace(rev.new)
            for f in rev.feeds:
                if f not in steps:
                    raise PlanError(f"added step feeds unknown step {f!r}")
                steps[f].deps = (*steps[f].deps, rev.new.id)
        old = self.steps
        self.steps = steps
        try:
            self._relink()
            self.check()
        except PlanError:
            self.steps = old
            self._relink()
            raise
        self.revisions.append((now, rev))

    def _relink(self) -> None:
        cons: dict[str, list[str]] = {sid: [] for sid in self.steps}
        for s in self.steps.values():
            if s.dropped:
                continue
            for d in s.deps:
                if d in cons:
                    cons[d].append(s.id)
        for sid, c in cons.items():
            self.steps[sid].consumers = tuple(c)

    def check(self) -> None:
        """Raise :class:`PlanError` unless the invariants hold."""
        live = {s.id: s for s in self.live()}
        answers = [s for s in live.values() if s.kind == "answer"]
        if len(answers) != 1:
            raise PlanError(f"a plan has exactly one live answer step, found {len(answers)}")
        for s in live.values():
            for d in s.deps:
                if d not in live:
                    raise PlanError(f"step {s.id!r} depends on {d!r}, which is not a live step")
        try:
            graphlib.TopologicalSorter({s.id: s.deps for s in live.values()}).prepare()
        except graphlib.CycleError as exc:
            raise PlanError(f"cycle in plan: {exc.args[1]}") from None

    def to_wire(self) -> dict[str, Any]:
        return {
            "task": self.task_id,
            "steps": [dataclasses.asdict(s) for s in self.steps.values()],
            "revisions": [
                {"t": t, "action": r.action, "step": r.step, "reason": r.reason, "new": r.new.id if r.new else None}
                for t, r in self.revisions
            ],
        }
