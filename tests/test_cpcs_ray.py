"""cpcs dispatching to ``work`` replicas placed on a Ray cluster (issue 28 step 4): a real
``python -m kernel`` on the session's one-node Ray cluster (tests/ray_support.py), the
``work`` pool as Ray-placed replicas that reach the kernel over tcp:// + CURVE on keys made on
their node, and ``cpcs`` local on the bus (services/cpcs/cluster.py's config).  A small DAG runs
through cpcs; every task ran on a Ray-placed worker, in dependency order, and ``status`` shows
where each replica runs.  Skipped, with the reason, only where Ray cannot start here."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from clients import Client
from services.cpcs.cluster import config
from tests.ray_support import curve_kernel, local_cluster

pytestmark = pytest.mark.system

WORKERS = 2
#: Bound on the Ray placement of every replica (a loaded 2-core machine: Ray's start takes 15-45 s).
PLACE_S = 300.0
CALL_S = 120.0


def W(tid, ms, deps=()):
    return {
        "id": tid,
        "service": "work",
        "eta_s": ms / 1000,
        "deps": list(deps),
        "payload": {"ms": ms, "steps": max(1, ms // 20)},
    }


def evs(out, ev, task=None):
    return [e for e in out["events"] if e["ev"] == ev and (task is None or e.get("task") == task)]


def _client(kern) -> Client:
    return kern.client(CALL_S)


@pytest.fixture(scope="module")
def cluster(request):
    """The kernel, with ``work`` placed on the session's one-node Ray cluster (tests/ray_support.py;
    ``[ray] local = true``, the kernel starting a cluster of its own, is run by ``bench ray --quick``
    and ``bench raycpcs --quick`` in tests/test_bench_quick.py)."""
    pytest.importorskip("ray")
    ray = local_cluster(request)
    k = curve_kernel(
        lambda kd: config(kd, workers=WORKERS, local=False, address=ray["address"], token_path=ray["token"])
    )
    c = _client(k)
    try:
        c.wait_for_service("cpcs", 60)
        deadline = time.monotonic() + PLACE_S
        names = [f"work@{i}" for i in range(WORKERS)]
        while True:
            up = c.stats()["services"]
            if all(up.get(n, {}).get("workers", 0) > 0 for n in names):
                break
            if time.monotonic() > deadline:
                reasons = {ch["name"]: ch["reason"] for ch in c.stats()["children"] if ch["name"].startswith("work")}
                if all(r and r.startswith("unavailable") for r in reasons.values()):
                    pytest.skip(f"Ray could not start here: {reasons}")
                pytest.fail(f"Ray-placed work replicas not up in {PLACE_S:.0f} s: {reasons}")
            time.sleep(1.0)
        yield c, k
    finally:
        c.close()
        k.stop(timeout=90)


def test_cpcs_runs_a_dag_on_ray_placed_workers(cluster):
    c, _ = cluster
    where = {ch["name"]: ch["where"] for ch in c.stats()["children"]}
    for i in range(WORKERS):  # status says where each replica runs
        w = where[f"work#{i}"]
        assert w["placement"] == "ray" and w["node_id"] and w["pid"]
    assert where["cpcs"] is None  # cpcs itself is local
    tasks = [W("a", 150), W("b", 300, ["a"]), W("c", 300, ["a"]), W("d", 150, ["b", "c"]), W("e", 200)]
    out = c.call("cpcs", {"dag": {"tasks": tasks}, "tick_ms": 50}, timeout=CALL_S)
    assert out["states"] == {"done": 5} and out["failed"] == [] and out["cancelled"] == []
    # every task's result came from a Ray-placed worker, and each worker said so itself
    assert set(out["results"]) == set("abcde")
    assert {r["worker"] for r in out["results"].values()} <= {f"work@{i}" for i in range(WORKERS)}
    assert out["where"] and all(w["placement"] == "ray" for w in out["where"].values())
    # dependency order held across the cluster
    start = {e["task"]: e["t"] for e in evs(out, "start")}
    done = {e["task"]: e["t"] for e in evs(out, "done")}
    assert done["a"] <= min(start["b"], start["c"]) and max(done["b"], done["c"]) <= start["d"]
    # no OS-priority order reached a remote worker (renice/affinity are this host's; skipped, not failed)
    assert not [e for e in evs(out, "order_failed") if e["op"] in ("nice", "affinity")]
    # the kernel billed the work to the workers' services as for local ones
    svc = c.stats()["services"]
    assert sum(svc[f"work@{i}"]["requests"] for i in range(WORKERS)) >= 5


def test_a_ray_replica_killed_mid_task_is_re_run_elsewhere_and_replaced(cluster):
    c, kern = cluster
    before = {ch["name"]: ch for ch in c.stats()["children"]}["work#0"]
    tasks = [W("p", 1500), W("q", 1500), W("r", 200, ["p", "q"])]
    box: dict = {}

    def call() -> None:
        with _client(kern) as cc:
            try:
                box["out"] = cc.call("cpcs", {"dag": {"tasks": tasks}, "tick_ms": 50}, timeout=CALL_S)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                box["err"] = exc

    th = threading.Thread(target=call, daemon=True)
    th.start()
    deadline = time.monotonic() + CALL_S
    while c.stats()["services"]["work@0"]["inflight"] < 1:  # a task is running on work#0's node
        assert th.is_alive() and time.monotonic() < deadline, f"nothing ran on work@0: {box}"
        time.sleep(0.05)
    os.kill(before["where"]["pid"], signal.SIGKILL)  # one node, one pid namespace: the node's process
    th.join(CALL_S + 10)
    assert not th.is_alive() and "err" not in box, box
    out = box["out"]
    assert out["states"] == {"done": 3} and out["failed"] == []
    # the attempt on the killed worker ended as the infrastructure's fault and ran again
    lost = evs(out, "lost")
    assert lost and all(e["worker"] == "work@0" for e in lost), out["events"]
    deadline = time.monotonic() + PLACE_S
    while True:  # the supervisor placed a new replica on Ray
        now = {ch["name"]: ch for ch in c.stats()["children"]}["work#0"]
        if now["restarts"] > before["restarts"] and now["state"] == "running":
            break
        assert time.monotonic() < deadline, f"work#0 not replaced: {now}"
        time.sleep(1.0)
    assert now["where"]["placement"] == "ray" and now["where"]["pid"] != before["where"]["pid"]
