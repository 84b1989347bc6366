"""``python -m clients`` — the command-line client.

    python -m clients call SERVICE ['<json>'] [--job J] [--budget '<json>'] [--priority N] [--timeout S]
    python -m clients status
    python -m clients demo [--endpoint E]     (without --endpoint: starts python -m kernel itself)

``--endpoint`` (or ``$RECA_ENDPOINT``) names the kernel; the default is the embedded ipc endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

from clients.core import default_endpoint
from clients.sync import Client
from clients.table import cell, render
from kernel import auth, errors
from kernel import protocol as P


def table(rows: list[dict], cols: list[str]) -> str:
    return render(rows, cols, digits=3)


def render_status(stats: dict) -> str:
    parts = []
    services = [dict(v, name=k) for k, v in sorted(stats.get("services", {}).items())]
    parts.append("SERVICES\n" + table(services, ["name", "workers", "free_slots", "queued", "inflight",
                                                 "requests", "finals", "errors", "p50_ms", "p99_ms"]))
    children = stats.get("children", [])
    if children:
        parts.append("PROCESSES\n" + table(children, ["name", "state", "pid", "restarts", "last_exit", "restart"]))
    jobs = [dict(v, name=k) for k, v in sorted(stats.get("jobs", {}).items())]
    if jobs:
        parts.append("JOBS\n" + table(jobs, ["name", "parent", "limits", "spent", "remaining", "exhausted"]))
    counters = {**stats.get("counters", {}), **stats.get("ledger", {})}
    if counters:
        parts.append("COUNTERS  " + cell(counters, 3))
    return "\n\n".join(parts)


def cmd_call(args: argparse.Namespace) -> int:
    payload = json.loads(args.payload) if args.payload else None
    budget = json.loads(args.budget) if args.budget else None
    with Client(args.endpoint, timeout=args.timeout) as client:
        try:
            result = client.call(args.service, payload, job=args.job, budget=budget, priority=args.priority,
                                 on_partial=lambda r: print(json.dumps({"partial": r.payload, "status": r.status},
                                                                       default=str), flush=True))
        except errors.RecaError as exc:
            print(json.dumps({"error": exc.code, "message": exc.message, **exc.detail}, default=str))
            return 1
    print(json.dumps(result, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with Client(args.endpoint, timeout=args.timeout, retries=0) as client:
        try:
            print(render_status(client.stats()))
        except errors.RecaError as exc:
            print(f"cannot reach the kernel at {client.endpoint}: {exc}", file=sys.stderr)
            return 1
    return 0


# -- demo -------------------------------------------------------------------------------------------


def _demo(client: Client, out=print) -> None:
    out("\n== 1. a request, streamed ==")
    client.wait_for_service("echo")
    result = client.call("echo", {"partials": 3, "hello": "reca"},
                         on_partial=lambda r: out(f"   partial {r.payload}"))
    out(f"   final   {result}")

    out("\n== 2. a budget the kernel enforces (job 'demo': 20,000 flops, 2 s of wall time) ==")
    client.open_job("demo", {"flops": 20_000, "wall_ms": 2_000})
    done = 0
    try:
        for i in range(100):
            client.call("echo", {"steps": 4, "step_ms": 1}, job="demo")  # 4,000 flops each
            done += 1
    except errors.BudgetExceeded as exc:
        out(f"   request {done + 1} refused or cut off: budget_exceeded ({exc.message})")
    stats = client.call(P.MMI_JOB_STATS, {"job": "demo"})
    out(f"   {done} requests ran; job spent {stats['spent']}, remaining {stats['remaining']}")
    try:
        client.call("echo", "more?", job="demo")
    except errors.BudgetExceeded:
        out("   a further request is refused: the job takes no more work (no client flag overrides this)")
    try:
        client.call("echo", {"steps": 2}, job="demo", budget={"flops": 10**9})
    except errors.BudgetExceeded:
        out("   ... even one that asks for a larger budget: asks are clamped to what the job has left")

    out("\n== 3. a gate for a counted resource (job 'grow': 3 prototypes) ==")
    client.open_job("grow", {"prototypes": 3})
    answers = []
    for _ in range(5):
        try:
            client.reserve("grow", "prototypes", 1, commit=True)
            answers.append("granted")
        except errors.Refused:
            answers.append("refused")
    out(f"   5 spawn requests: {answers}")

    out("\n== 4. preemption by priority ==")
    client.open_job("batch", {}, priority=0)
    client.open_job("urgent", {}, priority=10)
    results: dict[str, Any] = {}
    paused = []

    def low(tag: str) -> None:
        with Client(client.endpoint, timeout=20) as c:
            results[tag] = c.call("echo", {"steps": 60, "step_ms": 10}, job="batch", priority=0,
                                  on_partial=lambda r: paused.append(tag) if r.status == "paused" else None)

    threads = [threading.Thread(target=low, args=(f"low{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.15)  # let both low-priority runs occupy the two echo workers
    t0 = time.monotonic()
    urgent = client.call("echo", {"steps": 5, "step_ms": 10}, job="urgent", priority=10)
    out(f"   urgent request (priority 10) finished in {(time.monotonic() - t0) * 1000:.0f} ms: {urgent}")
    for t in threads:
        t.join(30)
    out(f"   low-priority runs paused at a safe point: {sorted(set(paused))}; "
        f"both resumed and finished: {sorted(results)}")
    reference = client.call("echo", {"steps": 60, "step_ms": 0})
    same = all(r == reference for r in results.values())
    out(f"   resumed results equal an uninterrupted run: {same}")

    configured = {ch["name"].split("#")[0] for ch in client.stats().get("children", [])}
    for name in ("ttc", "igms", "decode", "ids", "rois", "lot"):
        if name in configured:
            client.wait_for_service(name, 90)  # the decode worker loads torch and its weights first

    if client.call(P.MMI_SERVICE, "ttc") == "200":
        out("\n== 5. transactional tool calls: prepare two SAT solves, the plan changes, only one runs ==")
        client.open_job("plan", {"cpu_s": 60})
        keep = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 120, "seed": 6},
                                   "est_cost": 5, "consumers": ["step-a"]}, job="plan")
        drop = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 120, "seed": 7},
                                   "est_cost": 5, "consumers": ["step-b"]}, job="plan")
        out(f"   prepared {keep['call_id']} and {drop['call_id']} (nothing runs yet; budget held "
            f"{client.call(P.MMI_JOB_STATS, {'job': 'plan'})['remaining']})")
        aborted = client.call("ttc", {"op": "withdraw", "consumer": "step-b"})
        done = client.call("ttc", {"op": "commit", "call_id": keep["call_id"], "wait": True}, timeout=60)
        out(f"   plan dropped step-b: aborted {aborted['aborted']} before any heavy run; "
            f"committed one ran: {done['state']}, satisfiable={done['result']['value']['sat']}")

    if client.call(P.MMI_SERVICE, "igms") == "200":
        out("\n== 6. a simulation refined only where an invariant is breached (job 'dam': 5 refinements) ==")
        client.open_job("dam", {"refinements": 5})
        run = client.call("igms", {"case": "radial_dam_break", "blocks": 4, "cells": 8, "t_end": 1.0,
                                   "refine_tol": 1e-3}, job="dam", timeout=120)
        stats = client.call(P.MMI_JOB_STATS, {"job": "dam"})
        out(f"   radial dam break to t=1.0: {run['igms']['refinements_granted']} refinements granted, "
            f"{run['igms']['refinements_refused']} refused by the kernel's gate; "
            f"job spent {stats['spent']}")

    if client.call(P.MMI_SERVICE, "decode") == "200":
        out("\n== 7. reasoning: decode, verify, repair only the broken span, force a thunk ==")
        from clients import demo_reasoning

        demo_reasoning.run(client, out=out)

    out("\n== where the compute went ==")
    out(render_status(client.stats()))


def _replay_summary(path: str) -> None:
    """Re-run the ledger on the demo kernel's decision log (what ``python -m kernel replay`` does)."""
    from kernel.replay import replay_lines

    try:
        with open(path, encoding="utf-8") as fh:
            report = replay_lines(fh)
    except OSError as exc:
        print(f"no decision log to replay: {exc}")
        return
    print(f"decision log {path}: {report.replayed} ledger decisions replayed, {len(report.divergences)} "
          f"divergences; {report.observed} other records (preemptions, services' audit records)\n"
          f"   (python -m kernel replay {path})")


def cmd_demo(args: argparse.Namespace) -> int:
    from clients.launch import KernelStartError, LocalKernel

    kernel = None
    endpoint = args.endpoint
    started = threading.Event()  # once set, the kernel's output is kept (kernel.lines), not printed
    if endpoint is None:
        rundir = tempfile.mkdtemp(prefix="reca-demo-", dir="/tmp")
        print(f"starting python -m kernel (runtime {rundir}) ...", flush=True)
        try:
            kernel = LocalKernel(None, runtime_dir=rundir, log_level=None, start_timeout=60,
                                 echo=lambda line: None if started.is_set() else print("   kernel:", line, flush=True))
        except KernelStartError as exc:
            print(f"the kernel did not start: {exc}", file=sys.stderr)
            return 1
        endpoint = kernel.endpoint
    started.set()
    try:
        with Client(endpoint, timeout=30) as client:
            _demo(client)
    finally:
        if kernel is not None:
            rc, _ = kernel.stop(timeout=30)
            print(f"\nkernel stopped (exit {rc})")
            _replay_summary(kernel.decision_log)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients", description="reca command-line client")
    parser.add_argument("--endpoint", default=None, help=f"kernel endpoint (default {default_endpoint()})")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--cert", default=None, help="your secret certificate for tcp:// (default $RECA_CERT)")
    parser.add_argument("--server-cert", default=None,
                        help="the kernel's public certificate (default $RECA_SERVER_CERT)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("call", help="send one request")
    p.add_argument("service")
    p.add_argument("payload", nargs="?")
    p.add_argument("--job")
    p.add_argument("--budget")
    p.add_argument("--priority", type=int)
    sub.add_parser("status", help="services, processes, jobs")
    sub.add_parser("demo", help="the guided demo (starts a kernel unless --endpoint is given)")
    sub.add_parser("agent-demo", help="a planner suggests, reca decides: one task narrated (docs/agent.md)")
    args = parser.parse_args(argv)
    if args.cert:
        os.environ[auth.ENV_CERT] = args.cert
    if args.server_cert:
        os.environ[auth.ENV_SERVER_CERT] = args.server_cert
    try:
        if args.cmd == "call":
            args.endpoint = args.endpoint or default_endpoint()
            return cmd_call(args)
        if args.cmd == "status":
            args.endpoint = args.endpoint or default_endpoint()
            return cmd_status(args)
        if args.cmd == "agent-demo":
            from clients import agent_demo
            return agent_demo.main(args.endpoint)
        return cmd_demo(args)
    except (auth.AuthError, auth.UnsafeRuntimeDir) as exc:
        print(f"python -m clients: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
