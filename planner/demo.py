"""``python -m clients agent-demo``: a planner suggests, reca decides — one task end to end.

An algorithmic task: the scripted planner suggests a small SAT probe and, speculatively, the heavy
SAT calls for both of its outcomes, plus an arithmetic chain for the language model.  Then a
physics what-if: a coarse simulation and an escalation to a finer level.  The story is told
from the records of the kernel and its services, not from the client's intentions:

* the plan as suggested (steps, estimates, which are lazy) and the job's hard budgets;
* what ran and when (the executor's events), how the plan changed (revisions);
* what reca refused or never ran: ttc's durable log of the dropped branch (aborted before any
  run), cswif's refusal of an escalation that does not pay;
* where the compute went: the kernel's ledger (``mmi.job.stats``: tokens, FLOPs, tool CPU
  reserved, escalations) and the OS's CPU seconds of each service process (psutil; a tool
  worker's CPU is in its service's reaped-children time).

Without ``--endpoint`` it starts ``python -m kernel`` with the services it needs and stops it
afterwards.  ``run(endpoint, kernel_pid)`` drives it on a running kernel.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable

import psutil

from clients.aio import AsyncClient
from kernel import protocol as P
from planner import tasks
from planner import verify as V
from planner.execute import RunState, mode, run_task
from planner.scripted import ScriptedPlanner

#: cswif's gate threshold for the demo: the value `python -m bench agent` chose on its training
#: tasks (docs/agent.md); a smooth hump's escalation does not clear it, a dam break's does.
THRESHOLD = 0.024
TIMEOUT = 120.0


def _proc_cpu(kernel_pid: int) -> dict[str, float]:
    """CPU seconds per process of the kernel's tree, named by its service module."""
    out: dict[str, float] = {}
    try:
        root = psutil.Process(kernel_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        m = re.search(r"-m (services\.[\w.]+|kernel)", cmd)
        name = m.group(1) if m else "other"
        if name.startswith("services.ttc.toolworker"):
            name = "services.ttc (tool workers)"
        elif name.startswith("services."):
            name = name.split(".")[1]
        out[name] = out.get(name, 0.0) + t.user + t.system + t.children_user + t.children_system
    return out


def _self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _demo_tasks() -> tuple[tasks.Task, tasks.Task]:
    algo = next(t for t in tasks.generate("algo", 2026, 3, 2) if t.spec["swap"] is None)
    hump = tasks.generate("physics", 2026, 1, 1)[0]  # group 0: a smooth hump
    return algo, hump


async def _run(endpoint: str, kernel_pid: int, out: Callable[[str], Any]) -> dict:
    algo, hump = _demo_tasks()
    async with AsyncClient(endpoint, timeout=TIMEOUT, retries=0) as cl:
        rs = RunState(cl, mode("reca"), ScriptedPlanner(seed=1))
        plan = rs.planner.plan(algo)
        out(f"== task {algo.id} (algorithmic): the planner suggests ==")
        for sid in plan.order():
            s = plan.steps[sid]
            est = f"~{s.est_cpu_s:.2f} CPU s" if s.est_cpu_s else (f"~{s.est_tokens} tokens" if s.est_tokens else "")
            what = s.spec.get("inputs") or s.spec.get("items") or ""
            out(f"  {sid:9s} {s.kind:7s} {'lazy ' if s.lazy else '     '}{est:16s} {what}")
        before = _proc_cpu(kernel_pid)
        c0 = _self_cpu()
        run = await run_task(rs, algo)
        await rs.drain()
        await rs.settle(run)
        after = _proc_cpu(kernel_pid)
        client_cpu = _self_cpu() - c0
        out(f"\n== reca runs it: job {run.job}, hard budgets {run.limits} ==")
        for e in run.events:
            extra = e.get("action", "") + (" " + e["reason"] if e.get("reason") else "")
            how = e.get("how") or ""
            out(f"  {e['t0']:7.3f}-{e['t1']:7.3f} s  {e['step']:9s} {e['kind']:8s} {extra or how}")
        dropped = [r["step"] for r in run.revisions if r["action"] == "drop"]
        out("\n== what reca refused or never ran (ttc's durable log) ==")
        for h in rs.heavy:
            out(f"  ran {h.step}: {h.key} ({'used' if h.used else 'unused'})")
        for ab in run.aborted:
            rows = (await cl.call("ttc", {"op": "audit", "call_id": ab["call_id"]}, timeout=TIMEOUT, retries=0))[
                "events"
            ]
            out(
                f"  {ab['step']}: ttc call {ab['call_id']} -> {ab.get('state', ab.get('error'))} "
                f"after {ab.get('attempts', 0)} run(s) ({ab['reason']}); its log:"
            )
            for row in rows:
                out(
                    f"    {row.get('op', '?'):18s} {json.dumps(row.get('outputs') or row.get('inputs') or {}, default=str)[:90]}"
                )
        out(
            f"  dropped by the plan: {dropped}; heavy runs of dropped steps: "
            f"{sum(1 for h in rs.heavy if h.step in dropped and h.ran)}"
        )
        correct = V.verify(algo, run.answer, tol=1.0)
        out(f"  answer verified independently: {correct}")
        out("\n== where the compute went ==")
        out("  kernel ledger (mmi.job.stats): " + ", ".join(f"{k} {v:g}" for k, v in sorted(run.spent.items())))
        deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
        deltas["this client (planner, executor)"] = client_cpu
        for k, v in sorted(deltas.items(), key=lambda kv: -kv[1]):
            if v >= 0.005:
                out(f"  {k:28s} {v:6.2f} CPU s (OS)")

        out(
            f"\n== task {hump.id} (physics what-if): escalate {hump.spec['case']} from level "
            f"{hump.spec['from_level']} to {hump.spec['to_level']}? =="
        )
        prun = await run_task(rs, hump)
        await rs.settle(prun)
        for r in prun.refused:
            pred = r.get("prediction") or {}
            out(f"  cswif refused: {r['reason'][:140]}")
            if pred:
                out(
                    f"    predicted gain {pred.get('gain', 0):.3g} for {pred.get('cost', 0):.3g} cell updates "
                    f"(dry run {pred.get('surrogate_cost', 0):.3g})"
                )
        out(
            f"  answered at level {prun.answer['level']}; ledger: "
            + ", ".join(f"{k} {v:g}" for k, v in sorted(prun.spent.items()))
        )
        return {"algo": run, "physics": prun, "cpu": deltas, "correct": correct}


def run(endpoint: str, kernel_pid: int, out: Callable[[str], Any] = print) -> dict:
    return asyncio.run(_run(endpoint, kernel_pid, out))


def main(endpoint: str | None = None, out: Callable[[str], Any] = print) -> int:
    if endpoint is not None:
        pid = 0
        try:
            from clients.sync import Client

            with Client(endpoint, timeout=10, retries=0) as c:
                pid = int(c.call(P.MMI_STATS).get("kernel", {}).get("pid", 0) or 0)
        except Exception:  # noqa: BLE001 — the per-process CPU is then not shown
            pid = 0
        run(endpoint, pid, out)
        return 0
    from planner import kernel

    out("starting python -m kernel with " + ", ".join(kernel.SERVICES) + " ...")
    k = kernel.warm(kernel.start(THRESHOLD))
    try:
        run(k.endpoint, k.pid, out)
    finally:
        k.stop()
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m planner.demo (python -m clients agent-demo)",
        description="one task narrated: a planner suggests, reca decides",
    )
    parser.add_argument("--endpoint", help="a running kernel (default: start one with the planner's services)")
    raise SystemExit(main(parser.parse_args().endpoint))
