"""The task DAG a client submits to ``cpcs``: parsing and validation, before anything runs.

A DAG document is a msgpack map::

    {"tasks": [{"id", "service", "payload", "eta_s", "p_success"=1, "deps"=[], "kind"=service,
                "needs"={}, "steps"=None, "max_attempts"=3, "fallback"=None}, ...],
     "resources": {name: capacity}}

``tasks`` are in the planner's order (what FIFO follows).  ``eta_s`` is the planner's estimate
of one attempt's run time, ``p_success`` its estimate of one attempt succeeding.  ``needs``
names counted resources (declared in ``resources``) a task holds while it runs.  ``steps``: how
many progress units the service reports (a PARTIAL carrying ``i`` = index of the unit just done);
services that report ``progress`` (a fraction) need none.  ``fallback``: a replacement task
(``service``, ``payload``, ``eta_s``, ``p_success``) tried when every attempt failed (the
branch is replanned onto it).

Every defect is a :class:`DagError` (wire code ``bad_request``) raised here, so a bad DAG is
refused before a single task is dispatched: a cycle, an unknown or duplicate id, a negative,
zero or non-finite estimate, a probability outside (0, 1], a need that no capacity can hold.
"""

from __future__ import annotations

import dataclasses
import graphlib
import math
from typing import Any

from kernel import errors

#: Largest DAG accepted (tasks), and the longest id / service name.
MAX_TASKS = 10_000
MAX_NAME = 128
MAX_ATTEMPTS = 100
#: Largest estimate accepted (seconds): a week.
MAX_ETA_S = 7 * 24 * 3600.0


class DagError(errors.BadRequest):
    """The DAG (or a task of it) is malformed; ``reason`` says which rule it breaks."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task as submitted (immutable; the scheduler keeps the live state apart)."""

    id: str
    service: str
    payload: Any
    eta_s: float
    p_success: float = 1.0
    deps: tuple[str, ...] = ()
    kind: str = ""
    needs: tuple[tuple[str, float], ...] = ()
    steps: int | None = None
    max_attempts: int = 3
    fallback: "TaskSpec | None" = None


@dataclasses.dataclass(frozen=True)
class Dag:
    """A validated DAG: tasks in planner order, successor lists, a topological order."""

    tasks: dict[str, TaskSpec]
    succ: dict[str, tuple[str, ...]]
    topo: tuple[str, ...]
    resources: dict[str, float]

    def services(self) -> set[str]:
        out = {t.service for t in self.tasks.values()}
        out |= {t.fallback.service for t in self.tasks.values() if t.fallback is not None}
        return out

    def critical_path_s(self, dur: dict[str, float]) -> float:
        """Longest path through the DAG with task durations ``dur``."""
        finish: dict[str, float] = {}
        for tid in self.topo:
            t = self.tasks[tid]
            finish[tid] = max((finish[d] for d in t.deps), default=0.0) + dur[tid]
        return max(finish.values(), default=0.0)


def _num(v: Any, what: str, *, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DagError(f"{what} must be a number, got {v!r}", reason="type")
    x = float(v)
    if not math.isfinite(x):
        raise DagError(f"{what} must be finite, got {v!r}", reason="non_finite")
    if x < lo or (lo_open and x == lo) or x > hi:
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise DagError(f"{what} must lie in {bound}, got {v!r}", reason="range")
    return x


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise DagError(f"{what} must be a string of 1..{MAX_NAME} characters, got {v!r}", reason="type")
    return v


def _task(doc: Any, where: str, *, is_fallback: bool = False) -> TaskSpec:
    if not isinstance(doc, dict):
        raise DagError(f"{where} must be a map", reason="type")
    tid = "" if is_fallback else _name(doc.get("id"), f"{where}.id")
    service = _name(doc.get("service"), f"{where}.service")
    if "eta_s" not in doc:
        raise DagError(f"{where} needs an 'eta_s' estimate", reason="missing")
    eta = _num(doc["eta_s"], f"{where}.eta_s", lo=0.0, hi=MAX_ETA_S, lo_open=True)
    p = _num(doc.get("p_success", 1.0), f"{where}.p_success", lo=0.0, hi=1.0, lo_open=True)
    deps = doc.get("deps", [])
    if is_fallback and deps:
        raise DagError(f"{where}: a fallback takes its task's place and has no deps of its own", reason="type")
    if not isinstance(deps, (list, tuple)):
        raise DagError(f"{where}.deps must be a list of task ids", reason="type")
    deps = tuple(_name(d, f"{where}.deps[]") for d in deps)
    if len(set(deps)) != len(deps):
        raise DagError(f"{where}.deps lists a task twice", reason="duplicate")
    needs = doc.get("needs", {})
    if not isinstance(needs, dict):
        raise DagError(f"{where}.needs must be a map resource -> amount", reason="type")
    needs_t = tuple(sorted((_name(k, f"{where}.needs key"), _num(v, f"{where}.needs[{k}]", lo=0.0, hi=1e12))
                           for k, v in needs.items()))
    steps = doc.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= 10**9):
        raise DagError(f"{where}.steps must be a positive integer", reason="type")
    attempts = doc.get("max_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 < attempts <= MAX_ATTEMPTS:
        raise DagError(f"{where}.max_attempts must be an integer in 1..{MAX_ATTEMPTS}", reason="range")
    kind = doc.get("kind", service)
    kind = _name(kind, f"{where}.kind")
    fallback = None
    if doc.get("fallback") is not None:
        if is_fallback:
            raise DagError(f"{where}: a fallback cannot have its own fallback", reason="type")
        fallback = _task(doc["fallback"], f"{where}.fallback", is_fallback=True)
        fallback = dataclasses.replace(fallback, id=tid, deps=deps, needs=fallback.needs or needs_t)
    return TaskSpec(tid, service, doc.get("payload"), eta, p, deps, kind, needs_t, steps, attempts, fallback)


def parse_dag(doc: Any) -> Dag:
    """Validate a DAG document; raise :class:`DagError` on the first defect found."""
    if not isinstance(doc, dict):
        raise DagError("a DAG is a map with 'tasks'", reason="type")
    raw = doc.get("tasks")
    if not isinstance(raw, (list, tuple)) or not 0 < len(raw) <= MAX_TASKS:
        raise DagError(f"'tasks' must be a list of 1..{MAX_TASKS} tasks", reason="type")
    resources = doc.get("resources", {}) or {}
    if not isinstance(resources, dict):
        raise DagError("'resources' must be a map name -> capacity", reason="type")
    caps = {_name(k, "resource name"): _num(v, f"resources[{k}]", lo=0.0, hi=1e12) for k, v in resources.items()}
    tasks: dict[str, TaskSpec] = {}
    for i, t in enumerate(raw):
        spec = _task(t, f"tasks[{i}]")
        if spec.id in tasks:
            raise DagError(f"task id {spec.id!r} appears twice", reason="duplicate", task=spec.id)
        tasks[spec.id] = spec
    for spec in tasks.values():
        for d in spec.deps:
            if d not in tasks:
                raise DagError(f"task {spec.id!r} depends on unknown task {d!r}", reason="unknown_dep",
                               task=spec.id, dep=d)
        for s in (spec, spec.fallback):
            for res, amount in (s.needs if s is not None else ()):
                if res not in caps:
                    raise DagError(f"task {spec.id!r} needs undeclared resource {res!r}", reason="unknown_resource",
                                   task=spec.id)
                if amount > caps[res]:
                    raise DagError(f"task {spec.id!r} needs {amount:g} {res} but the capacity is {caps[res]:g}",
                                   reason="never_fits", task=spec.id)
    sorter = graphlib.TopologicalSorter({tid: t.deps for tid, t in tasks.items()})
    try:
        topo = tuple(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = [str(x) for x in exc.args[1]]
        raise DagError(f"the DAG has a cycle: {' -> '.join(cycle)}", reason="cycle", cycle=cycle) from None
    succ: dict[str, list[str]] = {tid: [] for tid in tasks}
    for spec in tasks.values():
        for d in spec.deps:
            succ[d].append(spec.id)
    return Dag(tasks, {k: tuple(v) for k, v in succ.items()}, topo, caps)


def dag_doc(dag: Dag) -> dict:
    """The document form of ``dag`` (inverse of :func:`parse_dag`; for peers and tests)."""
    def one(t: TaskSpec, with_id: bool = True) -> dict:
        d: dict[str, Any] = {"service": t.service, "payload": t.payload, "eta_s": t.eta_s, "p_success": t.p_success,
                             "kind": t.kind, "max_attempts": t.max_attempts, "needs": dict(t.needs)}
        if with_id:
            d.update(id=t.id, deps=list(t.deps))
        if t.steps is not None:
            d["steps"] = t.steps
        if t.fallback is not None:
            d["fallback"] = one(t.fallback, with_id=False)
        return d
    return {"tasks": [one(t) for t in dag.tasks.values()], "resources": dict(dag.resources)}
