"""``python -m bench raycpcs [--quick]`` — cpcs on a Ray cluster against Dask distributed (issue 28
step 4): the same DAGs, the same task bodies, the same worker count.

reca side: ``python -m kernel`` with ``[ray] local = true`` (a one-node Ray cluster it starts), the
``work`` pool as :data:`WORKERS` Ray-placed replicas (services/cpcs/cluster.py's config: each an
ordinary ``services.cpcs.work`` process, child of a Ray actor, reaching the kernel over tcp:// +
CURVE), ``cpcs`` local on the bus dispatching to them.  Dask side: ``distributed.LocalCluster`` with
:data:`WORKERS` single-threaded worker processes on the same machine (the same cluster shape: one
node, :data:`WORKERS` one-task workers), tasks submitted in the planner's order with their
dependencies (bench/cpcs.py ``_dask_run``, Dask's default: earlier submitted first), and again with
each task's HEFT upward rank from the planner's ETAs as its Dask ``priority`` (``dask_ranked``: Dask
given the critical path cpcs starts from).  Task bodies: the drawn run time held in 50 ms steps
(``services.cpcs.work`` / ``bench/_dask_work.hold``), failed attempts re-run (by cpcs's scheduler on
any worker; by Dask's body in place).

Makespans are client-observed walls: the ``cpcs`` call from send to FINAL (validation and worker
lookup included); Dask from the first ``submit`` to ``gather``.  Neither side's start-up is counted
(Ray's cluster start and placement, Dask's ``LocalCluster``).  DAG families from bench/_dags.py:
``layered`` (contention regime, estimates off), ``layered_fail`` (same with failing attempts),
``wfcommons`` (WfChef recipes).  The two peers run interleaved per DAG.

``--quick``: one small layered DAG with failures; the Ray placement gets at most
:data:`QUICK_PLACE_S` s (if it is not up, the reca figure is reported missing with the reason).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
from typing import Any

import zmq

from bench._common import Result, progress
from bench._dags import WFCOMMONS_RECIPES, layered, lower_bound, wfcommons
from bench.cpcs import PARAMS, STEP_S, _dask_run, planner_topo, work_doc
from services.cpcs.dag import Dag
from services.cpcs.logic import Truth

RUNS = 3
WORKERS = 4
QUICK_PLACE_S = 35.0
PLACE_S = 300.0
HEADLINE = {
    "cluster_cpcs_over_dask_ranked": "Dask distributed with HEFT upward ranks as task priorities (same workers, DAGs)",
    "cluster_cpcs_over_dask": "Dask distributed, tasks submitted in the planner's order (same workers, DAGs)",
}


def cases(quick: bool) -> list[tuple[str, str, object]]:
    """(family, case, thunk -> (dag, truth))."""
    if quick:
        return [
            (
                "layered_fail",
                "s0",
                lambda: layered(200, WORKERS, layers=2, chain_s=0.3 * 0.25, light_s=0.075 * 0.25, fail=0.5),
            )
        ]
    out: list[tuple[str, str, object]] = []
    out += [("layered", f"s{s}", lambda s=s: layered(100 + s, WORKERS, chain_s=0.3, light_s=0.075)) for s in range(3)]
    out += [
        ("layered_fail", f"s{s}", lambda s=s: layered(200 + s, WORKERS, chain_s=0.3, light_s=0.075, fail=0.5))
        for s in range(3)
    ]
    out += [("wfcommons", f"{r}", lambda r=r: wfcommons(300, r, 60, scale_s=2.0)) for r in WFCOMMONS_RECIPES]
    return out


def _dask_ranked(client: Any, dag: Dag, truth: dict[str, Truth]) -> float:
    """Dask with the planner's critical-path information: every task submitted (in the planner's
    topological order) with ``priority`` = its HEFT upward rank from the planner's ETAs (Dask runs
    higher priorities first, on the scheduler's queue and each worker's ready queue).  The same
    bodies as :func:`bench.cpcs._dask_run`; returns the makespan (s)."""
    from bench import _dask_work

    order = planner_topo(dag)
    rank: dict[str, float] = {}
    for tid in reversed(order):
        rank[tid] = dag.tasks[tid].eta_s + max((rank[c] for c in dag.succ[tid]), default=0.0)
    futs: dict[str, Any] = {}
    t0 = time.perf_counter()
    for tid in order:
        tr = truth[tid]
        deps = [futs[d] for d in dag.tasks[tid].deps]
        futs[tid] = client.submit(
            _dask_work.hold,
            tr.run_s * 1000.0,
            max(1, round(tr.run_s / STEP_S)),
            tr.fail_attempts,
            *deps,
            key=f"r-{tid}-{t0}",
            pure=False,
            priority=int(rank[tid] * 1e6),
        )
    client.gather(list(futs.values()))
    return time.perf_counter() - t0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(quick: bool = False) -> Result:
    from distributed import Client as DaskClient, LocalCluster

    from clients import Client
    from clients.launch import LocalKernel, short_tmpdir
    from kernel import keys
    from services.cpcs.cluster import config

    logging.getLogger("distributed").setLevel(logging.ERROR)
    notes = [f"loadavg at start: {_load()}"]
    metrics: dict[str, float] = {}
    table: list[dict] = []
    d = short_tmpdir("rcb-")
    kd = os.path.join(d, "keys")
    keys.new(kd, "op", "operator")
    t0 = time.monotonic()
    kern = LocalKernel(config(kd, workers=WORKERS, temp_dir=os.path.join(d, "ray"), ray_cpus=1))
    stack = contextlib.ExitStack()
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        # Dask's cluster starts while Ray places the replicas (neither start-up is measured)
        cluster = stack.enter_context(
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0")
        )
        dask = stack.enter_context(DaskClient(cluster))
        c = stack.enter_context(
            Client(
                kern.endpoint,
                timeout=120,
                retries=0,
                context=zmq.Context.instance(),
                cert=os.path.join(kd, "op.key_secret"),
                server_cert=os.path.join(kd, "kernel.key"),
            )
        )
        c.wait_for_service("cpcs", 60)
        place_s = QUICK_PLACE_S if quick else PLACE_S
        names = [f"work@{i}" for i in range(WORKERS)]
        placed = False
        while time.monotonic() - t0 < place_s:
            up = c.stats()["services"]
            if all(up.get(n, {}).get("workers", 0) > 0 for n in names):
                placed = True
                break
            time.sleep(0.5)
        if placed:
            metrics["ray_place_s"] = time.monotonic() - t0
        else:
            reasons = {ch["name"]: ch["reason"] for ch in c.stats()["children"] if ch["name"].startswith("work")}
            notes.append(
                f"the Ray-placed work replicas were not all up within {place_s:.0f} s (reasons: {reasons}); "
                "only Dask was measured"
            )
        where = {ch["name"]: ch["where"] for ch in c.stats()["children"] if ch["name"].startswith("work")}
        nodes = sorted({str((w or {}).get("node_id", "?"))[:8] for w in where.values()})
        progress("raycpcs", f"placed={placed} in {time.monotonic() - t0:.1f} s on node(s) {nodes}; loadavg {_load()}")
        # warm-up, not measured: Dask's workers import the task bodies, cpcs's first lookups
        warm_dag, warm_truth = layered(1, WORKERS, layers=1, chain_s=0.02, light_s=0.01)
        _dask_run(dask, warm_dag, warm_truth)
        _dask_ranked(dask, warm_dag, warm_truth)
        if placed:
            c.call("cpcs", {"dag": work_doc(warm_dag, warm_truth), "params": PARAMS}, timeout=300)
        for fam, case, make in cases(quick):
            dag, truth = make()  # type: ignore[operator]
            doc = work_doc(dag, truth)
            got: dict[str, float] = {"lower_bound": lower_bound(dag, truth, WORKERS)}
            if placed:
                s = time.perf_counter()
                out = c.call("cpcs", {"dag": doc, "policy": "cpcs", "tick_ms": 100, "params": PARAMS}, timeout=300)
                got["cpcs_ray"] = time.perf_counter() - s
                if out["failed"] or out["cancelled"]:
                    raise RuntimeError(f"{fam}/{case}: cpcs tasks failed: {out['failed']} {out['cancelled']}")
                if not all(w.get("placement") == "ray" for w in out["where"].values()):
                    raise RuntimeError(f"{fam}/{case}: a task ran off the Ray cluster: {out['where']}")
            got["dask"] = _dask_run(dask, dag, truth)
            got["dask_ranked"] = _dask_ranked(dask, dag, truth)
            for k, v in got.items():
                rows.setdefault(fam, {}).setdefault(k, []).append(v)
            progress(
                "raycpcs",
                f"{fam:12s} {case:12s} " + "  ".join(f"{k} {v:6.3f}" for k, v in got.items()) + f"  loadavg {_load()}",
            )
        if placed:
            notes.append(f"work replicas ran on Ray node(s) {nodes} (status where), one node: this machine")
    finally:
        stack.close()
        kern.stop(timeout=90)
        shutil.rmtree(d, ignore_errors=True)
    notes.append(f"loadavg at end: {_load()}")
    ratios_all: dict[str, list[float]] = {}
    for fam, r in rows.items():
        row: dict = {"family": fam, "cases": len(r["dask"])}
        row.update({f"{k} s": round(statistics.mean(v), 3) for k, v in r.items()})
        metrics[f"{fam}_dask_over_lb"] = statistics.mean(x / y for x, y in zip(r["dask"], r["lower_bound"]))
        metrics[f"{fam}_dask_ranked_over_lb"] = statistics.mean(
            x / y for x, y in zip(r["dask_ranked"], r["lower_bound"])
        )
        if "cpcs_ray" in r:
            for peer in ("dask", "dask_ranked"):
                ratios = [x / y for x, y in zip(r["cpcs_ray"], r[peer])]
                ratios_all.setdefault(peer, []).extend(ratios)
                row[f"cpcs_ray/{peer}"] = round(statistics.mean(ratios), 3)
                metrics[f"{fam}_cpcs_ray_over_{peer}"] = statistics.mean(ratios)
            metrics[f"{fam}_cpcs_ray_over_lb"] = statistics.mean(x / y for x, y in zip(r["cpcs_ray"], r["lower_bound"]))
        table.append(row)
    targets: dict[str, tuple[str, float]] = {}
    for peer, ratios in ratios_all.items():  # mean over every DAG of the run
        metrics[f"cluster_cpcs_over_{peer}"] = statistics.mean(ratios)
        targets[f"cluster_cpcs_over_{peer}"] = ("<=", 1.0)
    notes.append(
        f"{WORKERS} workers each side: reca's {WORKERS} Ray-placed work replicas (capacity 2: one running, "
        f"one paused) vs Dask's {WORKERS} worker processes x 1 thread; same DAGs, same task bodies; "
        "start-ups not counted; makespans are client-observed walls"
    )
    return Result(metrics=metrics, targets=targets, table=table, notes=notes)
