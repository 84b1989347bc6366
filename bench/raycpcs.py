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

``RECA_BENCH_RAYCPCS_NODES=2``: two nodes on this machine (:func:`two_nodes`: a Ray head and 2 Dask
workers here, a Ray worker node and 2 Dask workers in a second network namespace joined by a veth
pair, a Dask scheduler process here; 0.5 Ray CPU per replica so Ray puts 2 on each node).

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
from typing import Any, Iterator

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


#: ``RECA_BENCH_RAYCPCS_NODES=2``: two nodes (the second in its own network namespace).
NODES_ENV = "RECA_BENCH_RAYCPCS_NODES"


@contextlib.contextmanager
def two_nodes(d: str) -> Iterator[dict]:
    """A two-node cluster shape on this machine: network namespace ``ns`` joined by a veth pair;
    a Ray head (1 CPU) here and a Ray worker node (1 CPU) in ``ns``, token auth on; a Dask
    scheduler here and 2 Dask workers (1 thread each) here + 2 in ``ns``.  Yields
    ``{host, ns_addr, address, token, dask}``; everything is stopped and the namespace deleted."""
    import signal
    import socket
    import subprocess
    import sys

    from kernel.rayplace import free_ports, make_token, node_argv, start_node, stop_node, token_env

    def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)

    tag = (os.getpid() + 13) % 16384
    ns, a, b = f"reca-b{tag}", f"rbv{tag}a", f"rbv{tag}b"
    prefix = f"10.233.{tag // 64}."
    host, nsa = prefix + str((tag % 64) * 4 + 1), prefix + str((tag % 64) * 4 + 2)
    ip("netns", "add", ns)
    procs: list[subprocess.Popen] = []
    nodes: list[subprocess.Popen] = []
    try:
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        ip("link", "set", b, "netns", ns)
        ip("addr", "add", f"{host}/30", "dev", a)
        ip("link", "set", a, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{nsa}/30", "dev", b)
        ip("netns", "exec", ns, "ip", "link", "set", b, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        token = make_token(os.path.join(d, "auth_token"))
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, **token_env(token), "PYTHONPATH": repo, "RAY_USAGE_STATS_ENABLED": "0"}
        port = free_ports(1, host)[0]
        address = f"{host}:{port}"
        nodes.append(start_node(node_argv(head_port=port, node_ip=host, temp_dir=os.path.join(d, "ray")), env))
        deadline = time.monotonic() + 120
        while True:  # the head's GCS port answers: the worker node may join
            try:
                socket.create_connection((host, port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or nodes[0].poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(0.5)
        nodes.append(start_node(node_argv(address=address, node_ip=nsa), env, prefix=["ip", "netns", "exec", ns]))
        dport = free_ports(1, host)[0]
        denv = {**os.environ, "PYTHONPATH": repo}
        dask_cmd = [sys.executable, "-m", "dask"]
        out = subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [*dask_cmd, "scheduler", "--host", host, "--port", str(dport), "--no-dashboard"],
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=denv,
            )
        )
        for where, pre in ((host, []), (nsa, ["ip", "netns", "exec", ns])):
            for _ in range(2):
                argv = [
                    *pre,
                    *dask_cmd,
                    "worker",
                    f"tcp://{host}:{dport}",
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--host",
                    where,
                    "--no-dashboard",
                ]
                procs.append(subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True, env=denv))
        yield {"host": host, "ns_addr": nsa, "address": address, "token": token, "dask": f"tcp://{host}:{dport}"}
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for p in reversed(nodes):
            stop_node(p)
        ip("link", "del", a, check=False)
        ip("netns", "del", ns, check=False)


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
    nodes = int(os.environ.get(NODES_ENV, "1"))
    stack = contextlib.ExitStack()
    rows: dict[str, dict[str, list[float]]] = {}
    kern = None
    try:
        t0 = time.monotonic()
        if nodes == 2:
            shape = stack.enter_context(two_nodes(d))
            kern = LocalKernel(
                config(
                    kd,
                    workers=WORKERS,
                    local=False,
                    address=shape["address"],
                    token_path=shape["token"],
                    host=shape["host"],
                    replica_cpus=0.5,
                )
            )
            dask = stack.enter_context(DaskClient(shape["dask"], timeout=120))
            dask.wait_for_workers(WORKERS, timeout=180)
            notes.append(
                f"two nodes: Ray head + 2 Dask workers at {shape['host']}, Ray worker node + 2 Dask workers "
                f"at {shape['ns_addr']} (a second network namespace, veth pair); 1 Ray CPU per node, "
                "0.5 per work replica"
            )
        else:
            kern = LocalKernel(config(kd, workers=WORKERS, temp_dir=os.path.join(d, "ray"), ray_cpus=1))
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
        nodes_seen = sorted(
            f"{(w or {}).get('node_ip')}/{str((w or {}).get('node_id', '?'))[:8]}" for w in where.values()
        )
        progress(
            "raycpcs", f"placed={placed} in {time.monotonic() - t0:.1f} s on node(s) {nodes_seen}; loadavg {_load()}"
        )
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
            notes.append(f"work replicas ran on Ray node(s) {nodes_seen} (status where: node ip / node id)")
    finally:
        if kern is not None:
            kern.stop(timeout=90)
        stack.close()
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
