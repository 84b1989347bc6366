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
#: Memory ceilings of the Ray-placed echo's group on its node, and of a service that allocates
#: 256 MiB under a 64 MiB ceiling (the node's OOM killer ends it).
ECHO_MEM = 512 << 20
HOG_MEM = 64 << 20


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
            mem_bytes = {ECHO_MEM}
            [[service]]
            name = "hog"
            command = ["{sys.executable}", "-c", "x = b'x' * (256 << 20); import time; time.sleep(600)"]
            placement = "ray"
            restart = "temporary"
            ray_num_cpus = 0.1
            ray_label = "w1"
            mem_bytes = {HOG_MEM}
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


def _v1_dir(pid: int, controller: str) -> str | None:
    """The cgroup v1 directory of ``pid`` in ``controller``'s hierarchy (None if not mounted)."""
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller in ctrls.split(","):
                d = os.path.join("/sys/fs/cgroup", controller, path.lstrip("/"))
                return d if os.path.isdir(d) else None
    return None


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _frozen(pid: int, backend: str) -> bool:
    """Frozen as the node's enforcer freezes: its cgroup v1 freezer says FROZEN, or (signals) the
    process is stopped."""
    if backend == "cgroup1":
        return _read(os.path.join(_v1_dir(pid, "freezer") or "/nonexistent", "freezer.state")) == "FROZEN"
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


def _until(cond, what: str) -> None:
    deadline = time.monotonic() + CALL_S
    while not cond():
        assert time.monotonic() < deadline, f"not {what} within {CALL_S} s"
        time.sleep(0.1)


def test_node_agent_freezes_and_resumes_the_replica(cluster, kern):
    """The node-side stop: a freeze through the replica's agent (its group on the node's
    enforcer: the cgroup freezer here, SIGSTOP on the signals backend), seen on the node."""
    with _client(kern) as c:
        ch = _wait_running(c, "echo")
        pid, backend = ch["where"]["pid"], ch["where"]["enforcer"]
        c.call("mmi.proc.stop", {"child": "echo"})
        _until(lambda: _frozen(pid, backend), "frozen")
        c.call("mmi.proc.cont", {"child": "echo"})
        _until(lambda: not _frozen(pid, backend), "thawed")
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
        # positive, and no more than the CPU the node's group (cgroup accounting; signals: the
        # process's own times, in 10 ms ticks) has used in all, read after.
        pid = ch["where"]["pid"]
        if ch["where"]["enforcer"] == "cgroup1":
            group = os.path.dirname(_v1_dir(pid, "cpuacct"))  # the service's group (main's parent)
            node_total_ms = int(_read(os.path.join(group, "cpuacct.usage"))) / 1e6
        else:
            node_total_ms = sum(psutil.Process(pid).cpu_times()[:2]) * 1000.0 + 20.0
        assert 0 < cpu <= node_total_ms
        assert c.call("mmi.job.stats", {"job": "rayjob"})["spent"]["cpu_ms"] == pytest.approx(cpu)


def test_the_node_agent_enforces_with_the_nodes_cgroups(cluster, kern):
    """The replica's agent opens an enforcer on its node (kernel/enforce.py, the backend the kernel
    uses here too): the service runs in ``reca-<agent pid>/<name>/main`` with its ``mem_bytes`` as
    the group's memory ceiling; a Ray-placed service that allocates past its ceiling is ended by
    the node's OOM killer (exit -9, seen by the supervisor)."""
    with _client(kern) as c:
        st = c.stats()
        kernel_backend = (st.get("enforcer") or st.get("supervisor", {}).get("enforcer") or {}).get("backend")
        ch = _wait_running(c, "echo")
        where = ch["where"]
        assert where["enforcer"] in ("cgroup1", "cgroup2", "signals")
        if kernel_backend is not None:  # same machine, same mounts (the node entered only a netns)
            assert where["enforcer"] == kernel_backend
        if where["enforcer"] != "cgroup1":
            pytest.skip(f"the node's enforcer is {where['enforcer']}: the cgroup v1 checks do not apply")
        freezer = _v1_dir(where["pid"], "freezer")
        assert freezer is not None and freezer.endswith(f"/reca-{where['agent_pid']}/echo/main"), freezer
        memory = os.path.dirname(_v1_dir(where["pid"], "memory"))
        assert int(_read(os.path.join(memory, "memory.limit_in_bytes"))) == ECHO_MEM
        deadline = time.monotonic() + PLACE_S
        hog = _child(c, "hog")
        while hog["last_exit"] is None and time.monotonic() < deadline:
            time.sleep(0.5)
            hog = _child(c, "hog")
        assert hog["last_exit"] == -signal.SIGKILL, hog  # the OOM killer, inside its 64 MiB
        assert hog["restarts"] == 0  # temporary: not restarted


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
    cluster.rejoin_later()  # the next user of the session's cluster gets a worker node again
