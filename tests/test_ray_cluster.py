"""Ray placement on a real multi-node cluster (issue 28): a Ray head in this network namespace (with
the kernel) and a worker node in a second namespace joined by a veth pair, token authentication
on.  A ``placement = "ray"`` echo is pinned by label to the worker node; it reaches the kernel over
tcp:// with CURVE on a key pair made on that node.

Each Ray node runs under ``python -m kernel.raynode`` in a process group of its own and is stopped
(and its group killed) in a finalizer; the namespace and veth pair are deleted.  Skipped, with the
reason, only where namespaces cannot be created.  Every wait is bounded and generous (Ray's own
start-up on a loaded 2-core machine takes tens of seconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq

from clients import Client
from kernel import errors, keys
from kernel.rayplace import free_ports, make_token, node_argv, source_ip, start_node, stop_node, token_env
from tests.support import REPO, KernelProcess, short_tmpdir

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

#: Bounds of the waits (generous: Ray on a loaded machine).
NODE_START_S = 120.0
PLACE_S = 240.0
CALL_S = 60.0
NODE_TRIES = 3


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _nodes_alive(address: str, env: dict[str, str], want: int) -> bool:
    """Whether the cluster at ``address`` has ``want`` live nodes (asked by a short-lived driver)."""
    code = textwrap.dedent(f"""
        import ray, sys
        ray.init(address={address!r}, _node_ip_address={source_ip(address)!r}, log_to_driver=False,
                 logging_level="ERROR")
        print(sum(1 for n in ray.nodes() if n["Alive"]))
    """)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return False
    lines = out.stdout.strip().splitlines()
    return out.returncode == 0 and bool(lines) and lines[-1].isdigit() and int(lines[-1]) >= want


def _wait_nodes(address: str, env: dict[str, str], want: int, procs: list[subprocess.Popen]) -> bool:
    """Whether ``want`` nodes are alive within :data:`NODE_START_S` (False at once if a node's
    runner exited)."""
    deadline = time.monotonic() + NODE_START_S
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if _nodes_alive(address, env, want):
            return True
        time.sleep(2.0)
    return False


def _tail(d: str, name: str) -> str:
    try:
        with open(os.path.join(d, name), errors="replace") as fh:
            return fh.read()[-1500:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster():
    """``(kernel_addr, ns_addr, ray_address, token_path, ns)``: the head on ``kernel_addr`` (this
    namespace) and a worker node labelled ``reca-node=w1`` on ``ns_addr`` in namespace ``ns``."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: no `ip` command")
    tag = (os.getpid() + 7) % 16384
    ns, host_if, ns_if = f"reca-r{tag}", f"rrv{tag}a", f"rrv{tag}b"
    prefix = f"10.232.{tag // 64}."
    host_addr, ns_addr = prefix + str((tag % 64) * 4 + 1), prefix + str((tag % 64) * 4 + 2)
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"network namespaces cannot be created here: {made.stderr.strip()}")
    d = short_tmpdir("rr-")
    nodes: list[subprocess.Popen] = []
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        token = make_token(os.path.join(d, "auth_token"))
        env = {**os.environ, **token_env(token), "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"}
        address = None
        # One node at a time (half the start-up contention), each retried: Ray gives a new raylet
        # 30 s to register (ray/_private/node.py), which a loaded machine may miss.
        for _ in range(NODE_TRIES):
            port = free_ports(1, host_addr)[0]
            address = f"{host_addr}:{port}"
            head = start_node(
                node_argv(head_port=port, node_ip=host_addr, temp_dir=os.path.join(d, "ray")),
                env,
                stderr=open(os.path.join(d, "head.err"), "ab"),
            )
            nodes.append(head)
            if _wait_nodes(address, env, 1, [head]):
                break
            stop_node(head)
        else:
            pytest.fail(f"a Ray head did not come up in {NODE_TRIES} tries: {_tail(d, 'head.err')}")
        for _ in range(NODE_TRIES):
            worker = start_node(
                node_argv(address=address, node_ip=ns_addr, labels={"reca-node": "w1"}),
                env,
                prefix=["ip", "netns", "exec", ns],
                stderr=open(os.path.join(d, "worker.err"), "ab"),
            )
            nodes.append(worker)
            if _wait_nodes(address, env, 2, [head, worker]):
                break
            stop_node(worker)
        else:
            pytest.fail(f"a Ray worker node did not join in {NODE_TRIES} tries: {_tail(d, 'worker.err')}")
        yield host_addr, ns_addr, address, token, ns, nodes
    finally:
        for proc in reversed(nodes):
            stop_node(proc)
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(d, ignore_errors=True)
        left = [p for p in psutil.process_iter(["cmdline"]) if d in " ".join(p.info["cmdline"] or [])]
        for p in left:
            p.kill()
        assert not left, f"Ray processes left behind: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def kern(cluster):
    host_addr, _, address, token, _, _ = cluster
    d = short_tmpdir()
    kd = os.path.join(d, "keys")
    keys.new(kd, "op", "operator")
    config = textwrap.dedent(f"""
        [kernel]
        endpoint = "tcp://{host_addr}:0"
        control = "tcp://{host_addr}:0"
        heartbeat_s = 0.2
        liveness = 25
        unavailable_wait_s = 10.0
        [supervisor]
        intensity = 10
        period_s = 600.0
        backoff_initial_s = 0.2
        [auth]
        keys = "{kd}"
        [ray]
        address = "{address}"
        token_path = "{token}"
        [[service]]
        name = "echo"
        module = "services.echo"
        placement = "ray"
        ray_num_cpus = 0.5
        ray_label = "w1"
        [[service]]
        name = "local-echo"
        command = ["{sys.executable}", "-m", "services.echo", "--name", "local-echo"]
    """)
    k = KernelProcess.from_config(config)
    try:
        yield k, os.path.join(kd, "op.key_secret"), os.path.join(kd, "kernel.key")
    finally:
        k.stop(timeout=60)
        shutil.rmtree(d, ignore_errors=True)


def _client(kern) -> Client:
    k, cert, server = kern
    return Client(k.endpoint, timeout=CALL_S, retries=0, context=zmq.Context.instance(), cert=cert, server_cert=server)


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
    _, ns_addr, _, _, _, _ = cluster
    with _client(kern) as c:
        ch = _wait_running(c, "echo")
        c.wait_for_service("echo", PLACE_S)
        assert c.call("echo", {"x": 1}) == {"x": 1}
        assert c.call("local-echo", {"y": 2}) == {"y": 2}  # the rest of reca runs beside it
        # status says where the replica runs: the worker node in the other namespace.
        assert ch["where"]["placement"] == "ray" and ch["where"]["node_ip"] == ns_addr
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
    _, _, address, token, _, _ = cluster
    env = {**os.environ, **token_env(make_token(str(tmp_path / "other_token"))), "PYTHONPATH": REPO}
    assert not _nodes_alive(address, env, 1)
    good = {**os.environ, **token_env(token), "PYTHONPATH": REPO}
    assert _nodes_alive(address, good, 1)  # the same probe with the cluster's token gets in


def test_lost_node_mid_request_gives_worker_died(cluster, kern):
    """Last: the worker node is killed while a request runs on it; the caller gets worker_died and
    the supervisor keeps trying to place the replica (no node has its label: unavailable)."""
    _, _, _, _, _, nodes = cluster
    with _client(kern) as c:
        _wait_running(c, "echo")
        c.wait_for_service("echo", PLACE_S)
        k, cert, server = kern
        import threading

        box: dict = {}

        def long_call() -> None:
            with Client(
                k.endpoint, timeout=CALL_S * 3, retries=0, context=zmq.Context.instance(), cert=cert, server_cert=server
            ) as c2:
                try:
                    box["result"] = c2.call("echo", {"steps": 4000, "step_ms": 20})
                except errors.RecaError as exc:
                    box["error"] = exc.code

        t = threading.Thread(target=long_call)
        t.start()
        time.sleep(2.0)  # the request is in flight (it runs 80 s)
        stop_node(nodes[-1], timeout=10)  # the worker node: its raylet, the actor and the service
        t.join(CALL_S * 3)
        assert box.get("error") == "worker_died", box
        assert c.call("local-echo", 1) == 1
