"""Run one mode over a list of tasks on a running kernel and measure it.

Compute is what the operating system measured: the CPU seconds (user + system) of every process
of the kernel's tree — the kernel, every service, every tool worker and solver child, live or
already reaped (a reaped child's time is in its parent's ``children_*`` times) — plus this
client process, read with psutil before and after the batch.  Tokens and FLOPs are the kernel
ledger's (``mmi.job.stats`` of each task's job).  Answers are checked by
:func:`planner.verify.verify`, which never asks the services.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from typing import Any

import psutil

from clients.aio import AsyncClient
from planner import verify as V
from planner.execute import HeavyRun, RunState, TaskRun, mode, run_task
from planner.scripted import LMPlanner, ScriptedPlanner
from planner.tasks import Task

#: Bound on one batch's kernel round trips (seconds).
CLIENT_TIMEOUT = 120.0


def _label(p: psutil.Process) -> str:
    """The part of the kernel's tree a process belongs to: ``kernel``, a service's module name
    (``ttc``, ``ttc.toolworker``, ...), or, for helpers (a multiprocessing fork server, a solver
    child), the nearest such ancestor's."""
    while p is not None:
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return "other"
        for i, a in enumerate(cmd[:-1]):
            if a == "-m":
                mod = cmd[i + 1]
                return mod.removeprefix("services.") if mod.startswith("services.") else mod
        p = p.parent()
    return "other"


def tree_cpu_by(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of ``pid`` and all its descendants, reaped ones included (a
    reaped child's time is in its parent's ``children_*`` times), summed per :func:`_label`."""
    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            label = _label(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        out[label] = out.get(label, 0.0) + t.user + t.system + t.children_user + t.children_system
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and all its descendants, reaped ones included."""
    return sum(tree_cpu_by(pid).values())


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-label CPU spent between two :func:`tree_cpu_by` readings (a process that ended in
    between and was reaped by a live parent is in that parent's ``children_*``)."""
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 4) for k in sorted(set(before) | set(after))}


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


@dataclasses.dataclass
class Batch:
    mode: str
    runs: list[TaskRun]
    heavy: list[HeavyRun]
    cpu_s: float
    wall_s: float
    #: CPU seconds per part of the kernel's tree (``kernel``, each service, ``client``).
    cpu_by: dict[str, float] = dataclasses.field(default_factory=dict)

    def figures(self, family: str | None = None) -> dict[str, Any]:
        runs = [r for r in self.runs if family is None or r.task.family == family]
        ids = {r.task.id for r in runs}
        heavy = [h for h in self.heavy if h.task in ids]
        ran: dict[str, int] = {}
        for h in heavy:
            if h.ran:
                ran[h.key] = ran.get(h.key, 0) + 1
        overshoot = 0.0
        for r in runs:
            for k, lim in r.limits.items():
                if isinstance(lim, (int, float)) and lim > 0 and k in r.spent:
                    overshoot = max(overshoot, r.spent[k] / lim - 1.0)
        return {
            "tasks": len(runs),
            "correct": sum(1 for r in runs if r.correct),
            "accuracy": sum(1 for r in runs if r.correct) / len(runs) if runs else float("nan"),
            "tokens": sum(r.spent.get("tokens", 0.0) for r in runs),
            "flops": sum(r.spent.get("flops", 0.0) for r in runs),
            "task_wall_s": sum(r.wall_s for r in runs),
            "heavy_runs": sum(1 for h in heavy if h.ran),
            "duplicated": sum(n - 1 for n in ran.values()),
            "orphaned": sum(1 for h in heavy if h.ran and not h.used and not h.cancelled),
            "cancelled": sum(1 for h in heavy if h.cancelled),
            "refused": sum(len(r.refused) for r in runs),
            "overshoot": max(0.0, overshoot),
        }


def make_planner(kind: str, seed: int) -> Any:
    if kind == "scripted":
        return ScriptedPlanner(seed)
    if kind == "lm":
        return LMPlanner(lambda _p: "", seed)
    raise ValueError(f"unknown planner {kind!r}")


async def _run(endpoint: str, mode_name: str, planner: Any, tasks: list[Task]) -> tuple[list[TaskRun], RunState]:
    async with AsyncClient(endpoint, timeout=CLIENT_TIMEOUT, retries=0) as cl:
        rs = RunState(cl, mode(mode_name), planner)
        runs = []
        for t in tasks:
            runs.append(await run_task(rs, t))
        await rs.drain()
        for r in runs:
            await rs.settle(r)
        return runs, rs


def run_batch(
    endpoint: str,
    kernel_pid: int,
    mode_name: str,
    tasks: list[Task],
    *,
    tol: float,
    planner: str | None = None,
    seed: int = 0,
) -> Batch:
    """Run ``tasks`` one after another in ``mode_name`` and measure the batch.  The planner is the
    scripted one, except in ``llmseq`` (the language model's)."""
    kind = planner or ("lm" if mode_name == "llmseq" else "scripted")
    c0, s0, t0 = tree_cpu_by(kernel_pid), self_cpu(), time.monotonic()
    runs, rs = asyncio.run(_run(endpoint, mode_name, make_planner(kind, seed), tasks))
    wall = time.monotonic() - t0
    by = cpu_delta(c0, tree_cpu_by(kernel_pid))
    by["client"] = round(self_cpu() - s0, 4)
    cpu = sum(by.values())
    for r in runs:
        r.correct = V.verify(r.task, r.answer, tol=tol)
    return Batch(mode_name, runs, rs.heavy, cpu, wall, by)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
