"""cpcs on a two-node Ray cluster (issue 28 step 4 on step 5's set-up): the Ray head and the kernel
(with ``cpcs``) in this network namespace, a Ray worker node in a second namespace joined by a veth
pair (tests/ray_support.py's session cluster, shared with tests/test_ray_cluster.py: token auth on, every node stopped and
reaped, the namespace deleted).  The ``work`` replicas are pinned by label to the worker node, so
every task cpcs dispatches crosses the veth pair to another node and back over tcp:// + CURVE.
Skipped, with the reason, only where namespaces cannot be made."""

from __future__ import annotations

import pytest

from services.cpcs.cluster import config
from tests.ray_support import curve_kernel, netns_cluster
from tests.test_cpcs_ray import CALL_S, PLACE_S, WORKERS, W  # one DAG vocabulary for both shapes

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def test_cpcs_dispatches_to_work_replicas_on_another_node(request):
    cluster = netns_cluster(request)  # the session's two-node cluster (shared with test_ray_cluster)
    ns_addr = cluster.ns_addr
    k = curve_kernel(
        lambda kd: config(
            kd,
            workers=WORKERS,
            local=False,
            address=cluster.address,
            token_path=cluster.token,
            label="w1",
            host=cluster.host_addr,
            heartbeat_s=0.2,
            liveness=25,
        )
    )
    try:
        with k.client(CALL_S) as c:
            for i in range(WORKERS):
                c.wait_for_service(f"work@{i}", PLACE_S)
            c.wait_for_service("cpcs", 60)
            where = {ch["name"]: ch["where"] for ch in c.stats()["children"]}
            for i in range(WORKERS):  # both replicas run on the worker node, not the kernel's
                assert where[f"work#{i}"]["placement"] == "ray" and where[f"work#{i}"]["node_ip"] == ns_addr
            assert where["cpcs"] is None
            tasks = [W("a", 150), W("b", 300, ["a"]), W("c", 300, ["a"]), W("d", 150, ["b", "c"])]
            out = c.call("cpcs", {"dag": {"tasks": tasks}, "tick_ms": 50}, timeout=CALL_S)
            assert out["states"] == {"done": 4} and out["failed"] == []
            assert set(out["results"]) == set("abcd")
            assert {r["worker"] for r in out["results"].values()} <= {f"work@{i}" for i in range(WORKERS)}
            assert out["where"] and all(w["placement"] == "ray" for w in out["where"].values())
            start = {e["task"]: e["t"] for e in out["events"] if e["ev"] == "start"}
            done = {e["task"]: e["t"] for e in out["events"] if e["ev"] == "done"}
            assert done["a"] <= min(start["b"], start["c"]) and max(done["b"], done["c"]) <= start["d"]
            # b and c ran side by side, one on each remote replica
            assert {e["worker"] for e in out["events"] if e["ev"] == "start" and e["task"] in "bc"} == {
                f"work@{i}" for i in range(WORKERS)
            }
    finally:
        k.stop(timeout=90)
