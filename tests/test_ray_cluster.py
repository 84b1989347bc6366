"""Ray placement on a real multi-node cluster (issue 28): a Ray head in this network namespace (with
the kernel) and a worker node in a second namespace joined by a veth pair, token authentication
on.  A ``placement = "ray"`` echo is pinned by label to the worker node; it reaches the kernel over
tcp:// with CURVE on a key pair made on that node.

The cluster is the session's (tests/ray_support.py, shared with tests/test_cpcs_ray_nodes.py): each
Ray node runs under ``python -m kernel.raynode`` in a process group of its own and is stopped (and
its group killed) when the session ends; the namespace and veth pair are deleted.  Skipped, with the
reason, only where namespaces cannot be created.  Every wait is bounded and generous (Ray's own
start-up on a loaded 2-core machine takes tens of seconds).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil
import pytest

from clients import Client
from kernel import errors
from kernel.rayplace import make_token, stop_node, token_env
from tests.ray_support import NetnsCluster, curve_kernel, kernel_toml, netns_cluster, nodes_alive
from tests.support import REPO

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

#: Bounds of the waits (generous: Ray on a loaded machine).
PLACE_S = 240.0
CALL_S = 60.0


@pytest.fixture(scope="module")
def cluster(request) -> NetnsCluster:
    """The session's two-node cluster (tests/ray_support.py): the head on ``host_addr`` (this
    namespace) and a worker node labelled ``reca-node=w1`` on ``ns_addr`` in namespace ``ns``."""
    return netns_cluster(request)


@pytest.fixture(scope="module")
def kern(cluster):
    k = curve_kernel(
        lambda kd: kernel_toml(
            kd,
            f"""
            address = "{cluster.address}"
            token_path = "{cluster.token}"
            """,
            f"""
            [[service]]
            name = "echo"
            module = "services.echo"
            placement = "ray"
            ray_num_cpus = 0.5
            ray_label = "w1"
            [[service]]
            name = "local-echo"
            command = ["{sys.executable}", "-m", "services.echo", "--name", "local-echo"]
            """,
            host=cluster.host_addr,
        )
    )
    try:
        yield k
    finally:
        k.stop(timeout=60)


def _client(kern, timeout: float = CALL_S) -> Client:
    return kern.client(timeout)


def _child(c: Client, name: str) -> dict:
    return next(ch for ch in c.stats()["children"] if ch["name"] == name)


def _wait_running(c: Client, name: str, *, restarts: int = 0) -> dict:
    deadline = time.monotonic() + PLACE_S
    while time.monotonic() < deadline:
        ch = _child(c, name)
        if ch["state"] == "running" and ch["restarts"] >= restarts:
            return ch
        time.sleep(1.0)
    raise AssertionError(f"{name} not running (restarts >= {restarts}) within {PLACE_S} s: {_child(c, name)}")


def test_echo_placed_on_the_labelled_node_over_curve(cluster, kern):
    with _client(kern) as c:
        ch = _wait_running(c, "echo")
        c.wait_for_service("echo", PLACE_S)
        assert c.call("echo", {"x": 1}) == {"x": 1}
        assert c.call("local-echo", {"y": 2}) == {"y": 2}  # the rest of reca runs beside it
        # status says where the replica runs: the worker node in the other namespace.
        assert ch["where"]["placement"] == "ray" and ch["where"]["node_ip"] == cluster.ns_addr
        # It registered on a key the kernel authorised when its actor enrolled: a child principal.
        workers = {w["service"]: w for w in c.stats()["workers"]}
        assert "echo" in workers and "local-echo" in workers


def test_killed_replica_is_restarted_by_the_supervisor(cluster, kern):
    with _client(kern) as c:
        before = _wait_running(c, "echo")
        c.wait_for_service("echo", PLACE_S)
        os.kill(before["where"]["pid"], signal.SIGKILL)  # one pid namespace: the node's process
        after = _wait_running(c, "echo", restarts=before["restarts"] + 1)
        assert after["where"]["pid"] != before["where"]["pid"]
        assert after["reason"] is None or "SIGKILL" in (after["reason"] or "") or after["last_exit"] == -9
        c.wait_for_service("echo", PLACE_S)
        assert c.call("echo", {"again": True}) == {"again": True}


def test_node_agent_freezes_and_resumes_the_replica(cluster, kern):
    """The node-side stop: SIGSTOP through the replica's agent, seen on the node's process."""
    with _client(kern) as c:
        ch = _wait_running(c, "echo")
        pid = ch["where"]["pid"]
        c.call("mmi.proc.stop", {"child": "echo"})
        deadline = time.monotonic() + CALL_S
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
        c.call("mmi.proc.cont", {"child": "echo"})
        deadline = time.monotonic() + CALL_S
        while psutil.Process(pid).status() == psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
        c.wait_for_service("echo", PLACE_S)
        assert c.call("echo", 7) == 7
        # A pid on another node is never handed to this machine's scheduler calls.
        with pytest.raises(errors.RecaError, match="runs on a Ray node"):
            c.call("mmi.proc.nice", {"child": "echo", "nice": 5})


def test_cpu_is_measured_on_the_node_and_billed_by_the_kernel(cluster, kern):
    with _client(kern) as c:
        ch = _wait_running(c, "echo")
        c.wait_for_service("echo", PLACE_S)
        c.open_job("rayjob", {"cpu_ms": 600_000})
        replies = list(c.stream("echo", {"steps": 150, "step_ms": 20}, job="rayjob"))  # ~3 s busy
        cpu = replies[-1].spent["cpu_ms"]
        # Measured by the replica's agent on its node (polled each second), not reported by echo:
        # positive, and no more than the CPU the node's process has used in all.
        node_total_ms = sum(psutil.Process(ch["where"]["pid"]).cpu_times()[:2]) * 1000.0
        assert 0 < cpu <= node_total_ms
        assert c.call("mmi.job.stats", {"job": "rayjob"})["spent"]["cpu_ms"] == pytest.approx(cpu)


def test_a_driver_without_the_token_cannot_join(cluster, tmp_path):
    """Ray's token authentication is on: a driver with another token is refused by the GCS."""
    env = {**os.environ, **token_env(make_token(str(tmp_path / "other_token"))), "PYTHONPATH": REPO}
    assert not nodes_alive(cluster.address, env, 1)
    good = {**os.environ, **token_env(cluster.token), "PYTHONPATH": REPO}
    assert nodes_alive(cluster.address, good, 1)  # the same probe with the cluster's token gets in


def test_lost_node_mid_request_gives_worker_died(cluster, kern):
    """Last: the worker node is killed while a request runs on it; the caller gets worker_died and
    the supervisor keeps trying to place the replica (no node has its label: unavailable)."""
    with _client(kern) as c:
        _wait_running(c, "echo")
        c.wait_for_service("echo", PLACE_S)
        box: dict = {}

        def long_call() -> None:
            with _client(kern, CALL_S * 3) as c2:
                try:
                    box["result"] = c2.call("echo", {"steps": 4000, "step_ms": 20})
                except errors.RecaError as exc:
                    box["error"] = exc.code

        t = threading.Thread(target=long_call)
        t.start()
        time.sleep(2.0)  # the request is in flight (it runs 80 s)
        stop_node(cluster.worker, timeout=10)  # the worker node: its raylet, the actor and the service
        t.join(CALL_S * 3)
        assert box.get("error") == "worker_died", box
        assert c.call("local-echo", 1) == 1
