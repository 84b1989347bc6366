"""Shared Ray clusters and kernel configs for the Ray test modules (tests/test_ray*.py,
tests/test_ttc_ray*.py, tests/test_cpcs_ray*.py).

Starting a Ray node on a loaded 2-core machine takes 15-45 s, so each kind of cluster is started at
most once per pytest process, on first use, and stopped (every Ray process reaped, the namespace
deleted) when the session ends:

* :func:`local_cluster` -- one head on 127.0.0.1, token authentication on (the ttc and cpcs
  single-node tests);
* :func:`netns_cluster` -- a head in this network namespace and a worker node labelled
  ``reca-node=w1`` in a second namespace joined by a veth pair (the two-node tests); a directory
  of this host, ``host_only``, is hidden from the worker node.  A test that
  stops the worker node (node lost mid-request) leaves it to the next user to re-join one:
  :meth:`NetnsCluster.ensure_worker`.

A module asks for one through a module-scoped fixture of its own (``return local_cluster(request)``);
the cluster itself lives in this module (fixtures imported into several modules would be one
instance per module), and its stop is a finalizer of the pytest *session*.  Tests that need a
cluster of their own (a wrong token, an unreachable address) still make theirs.

:func:`curve_kernel` is the tcp:// + CURVE kernel every Ray test runs (operator key, ``[ray]``
table, services) with a client factory.  Every wait here is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import time
from typing import Any

import psutil
import pytest
import zmq

from clients import Client
from kernel import keys
from kernel.rayplace import free_ports, make_token, node_argv, source_ip, start_node, stop_node, token_env
from tests.support import REPO, KernelProcess, short_tmpdir

__all__ = ["CurveKernel", "NetnsCluster", "curve_kernel", "local_cluster", "netns_cluster", "nodes_alive"]

#: Bound on one node's start (Ray on a loaded machine), and how many starts are tried.
NODE_START_S = 150.0
NODE_TRIES = 3
#: Ray CPUs of the shared local head: 2 work replicas of 0.5 + ttc tasks of 0.25 fit.
LOCAL_CPUS = 2

_token: str | None = None
_local: dict[str, Any] | None = None
_local_failed: str | None = None
_netns: NetnsCluster | None = None
_netns_failed: str | None = None


def session_token(request: pytest.FixtureRequest) -> str:
    """One Ray token for every cluster of the session: a process that was a driver of one cluster
    keeps the first token it read (Ray's token loader caches it), so a second cluster with another
    token refused it ("Failed to connect to GCS")."""
    global _token
    if _token is None or not os.path.exists(_token):
        d = short_tmpdir("rt-")
        _token = make_token(os.path.join(d, "auth_token"))
        request.session.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    return _token


def nodes_alive(address: str, env: dict[str, str], want: int, port: int | None = None) -> bool:
    """Whether the cluster at ``address`` has ``want`` live nodes, one of them the node whose
    node-manager port is ``port`` if given (asked by a short-lived driver in a subprocess, with
    ``env``'s token; a node killed a moment ago may still count as alive, a new port cannot)."""
    code = textwrap.dedent(f"""
        import ray
        ray.init(address={address!r}, _node_ip_address={source_ip(address)!r}, log_to_driver=False,
                 logging_level="ERROR")
        alive = [n for n in ray.nodes() if n["Alive"]]
        ok = {port!r} is None or any(n.get("NodeManagerPort") == {port!r} for n in alive)
        print(len(alive) if ok else 0)
    """)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return False
    lines = out.stdout.strip().splitlines()
    return out.returncode == 0 and bool(lines) and lines[-1].isdigit() and int(lines[-1]) >= want


def _wait_nodes(
    address: str, env: dict[str, str], want: int, procs: list[subprocess.Popen], port: int | None = None
) -> bool:
    """Whether ``want`` nodes (one on ``port``) are alive within :data:`NODE_START_S` (False at
    once if a node's runner exited)."""
    deadline = time.monotonic() + NODE_START_S
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if nodes_alive(address, env, want, port):
            return True
        time.sleep(2.0)
    return False


def _tail(d: str, name: str) -> str:
    try:
        with open(os.path.join(d, name), errors="replace") as fh:
            return fh.read()[-1500:]
    except OSError:
        return ""


def _leftovers(d: str) -> list[int]:
    """Kill and return the pids of processes whose command line names ``d`` (none expected)."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if d in " ".join(p.info["cmdline"] or []):
                p.kill()
                left.append(p.pid)
        except psutil.Error:
            pass
    return left


# -- the local one-node cluster -------------------------------------------------------------------


def local_cluster(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``{"address", "token", "head"}`` of the session's one-node cluster (started on first use;
    the test is skipped with the reason if Ray cannot start here).  This process is *not* left
    connected as a driver: a module that drives Ray itself connects and disconnects."""
    global _local, _local_failed
    if _local is not None and _local["head"].poll() is None:
        return _local
    if _local_failed is not None:
        pytest.skip(_local_failed)
    import ray

    from services.ttc.rayrun import start_local_cluster

    temp = short_tmpdir("rs-")
    saved = {k: os.environ.get(k) for k in token_env("")}
    try:
        head, address, token = start_local_cluster(
            temp, start_s=NODE_START_S, tries=NODE_TRIES, num_cpus=LOCAL_CPUS, token_path=session_token(request)
        )
    except RuntimeError as exc:
        _local_failed = f"cannot start a Ray node here: {exc}"
        shutil.rmtree(temp, ignore_errors=True)
        pytest.skip(_local_failed)
    ray.shutdown()  # started and checked as a driver; the users connect themselves
    _local = {"address": address, "token": token, "head": head}

    def stop() -> None:
        global _local
        ray.shutdown()
        stop_node(head)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _local = None
        shutil.rmtree(temp, ignore_errors=True)
        _leftovers(temp)

    request.session.addfinalizer(stop)
    return _local


def connect_driver(cluster: dict[str, Any]) -> None:
    """Connect this process to the local cluster as a Ray driver (token authentication)."""
    import ray
    from ray._raylet import Config  # type: ignore[attr-defined]

    os.environ.update(token_env(cluster["token"]))
    Config.initialize("")  # Ray re-reads RAY_AUTH_MODE (kernel/rayplace.py does the same)
    ray.init(
        address=cluster["address"],
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": REPO}},
    )


# -- the two-node cluster in network namespaces ----------------------------------------------------


def netns_prefix(ns: str, hide: str | None = None) -> list[str]:
    """The command prefix that runs a node in namespace ``ns`` as another host would be: ``nsenter
    --net`` (this machine's mounts, its cgroup hierarchies included: ``ip netns exec`` remounts
    /sys and hides them) and, given ``hide`` (a directory), a mount namespace of its own in which
    an empty tmpfs covers ``hide`` -- what is there (a ttc coordinator's run files) is not visible
    on the node, as on a separate machine."""
    if not (shutil.which("nsenter") and os.path.exists(f"/run/netns/{ns}")):
        return ["ip", "netns", "exec", ns]
    prefix = ["nsenter", f"--net=/run/netns/{ns}"]
    if hide is not None and shutil.which("unshare"):
        cover = f'mount -t tmpfs -o size=16m reca-node-cover "{hide}" && exec "$@"'
        prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c", cover, "node"]
    return prefix


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclasses.dataclass
class NetnsCluster:
    """A head on ``host_addr`` (this namespace) and a worker node on ``ns_addr`` in namespace ``ns``."""

    host_addr: str
    ns_addr: str
    address: str
    token: str
    ns: str
    head: subprocess.Popen
    worker: subprocess.Popen | None
    dir: str
    env: dict[str, str]
    #: A replacement worker node started in the background, and its node-manager port.
    pending: tuple[subprocess.Popen, int] | None = None
    #: A directory of this host that the worker node does not see (an empty tmpfs covers it
    #: there): what a test puts in it is on "this host" only.
    host_only: str | None = None

    def _launch(self) -> tuple[subprocess.Popen, int]:
        """Start a worker node labelled ``reca-node=w1`` in the namespace (not waited for);
        returns it and its node-manager port."""
        argv = node_argv(address=self.address, node_ip=self.ns_addr, labels={"reca-node": "w1"})
        port = int(next(a for a in argv if a.startswith("--node-manager-port=")).partition("=")[2])
        node = start_node(
            argv,
            self.env,
            prefix=netns_prefix(self.ns, self.host_only),
            stderr=open(os.path.join(self.dir, "worker.err"), "ab"),
        )
        return node, port

    def rejoin_later(self) -> None:
        """After a test stopped the worker node: start its replacement now, in the background (the
        next :meth:`ensure_worker` waits for it to join)."""
        if self.pending is None:
            self.pending = self._launch()

    def ensure_worker(self) -> subprocess.Popen:
        """The worker node, re-joined (tried :data:`NODE_TRIES` times) if a test stopped it."""
        if self.worker is not None and self.worker.poll() is None:
            return self.worker
        self.worker = None
        for _ in range(NODE_TRIES):
            node, port = self.pending or self._launch()
            self.pending = None
            if _wait_nodes(self.address, self.env, 2, [self.head, node], port):
                self.worker = node
                return node
            stop_node(node)
        # Ray's own start (its hard-coded 30 s raylet registration) failing on an overloaded
        # machine is not a reca failure: skipped with Ray's reason, once for the session.
        global _netns_failed
        _netns_failed = f"a Ray worker node did not join in {NODE_TRIES} tries: {_tail(self.dir, 'worker.err')}"
        pytest.skip(_netns_failed)


def netns_cluster(request: pytest.FixtureRequest) -> NetnsCluster:
    """The session's two-node cluster (made on first use, the worker node re-joined if stopped);
    skipped with the reason where namespaces cannot be made."""
    global _netns, _netns_failed
    if _netns_failed is not None:
        pytest.skip(_netns_failed)
    if _netns is not None:
        _netns.ensure_worker()
        return _netns
    if shutil.which("ip") is None:
        _netns_failed = "network namespaces unavailable: no `ip` command"
        pytest.skip(_netns_failed)
    tag = (os.getpid() + 7) % 16384
    ns, host_if, ns_if = f"reca-r{tag}", f"rrv{tag}a", f"rrv{tag}b"
    prefix = f"10.232.{tag // 64}."
    host_addr, ns_addr = prefix + str((tag % 64) * 4 + 1), prefix + str((tag % 64) * 4 + 2)
    made = _ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        _netns_failed = f"network namespaces cannot be created here: {made.stderr.strip()}"
        pytest.skip(_netns_failed)
    d = short_tmpdir("rr-")
    nodes: list[subprocess.Popen] = []

    def teardown() -> None:
        global _netns
        if _netns is not None and _netns.pending is not None:
            stop_node(_netns.pending[0])
        if _netns is not None and _netns.worker is not None:
            stop_node(_netns.worker)
        for proc in reversed(nodes):
            stop_node(proc)
        _netns = None
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(d, ignore_errors=True)
        left = _leftovers(d)
        assert not left, f"Ray processes left behind: {left}"

    request.session.addfinalizer(teardown)
    _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
    _ip("link", "set", ns_if, "netns", ns)
    _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
    _ip("link", "set", host_if, "up")
    _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_if)
    _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
    _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    token = session_token(request)
    env = {**os.environ, **token_env(token), "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"}
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
        _netns_failed = f"a Ray head did not come up in {NODE_TRIES} tries: {_tail(d, 'head.err')}"
        pytest.skip(_netns_failed)
    host_only = os.path.join(d, "host-only")
    os.makedirs(host_only)
    _netns = NetnsCluster(host_addr, ns_addr, address, token, ns, head, None, d, env, host_only=host_only)
    _netns.ensure_worker()
    return _netns


# -- a tcp:// + CURVE kernel with a [ray] table -----------------------------------------------------


@dataclasses.dataclass
class CurveKernel:
    """A running kernel (:class:`KernelProcess`) whose operator key is in ``keys``."""

    k: KernelProcess
    keys: str
    dir: str

    @property
    def endpoint(self) -> str:
        return self.k.endpoint

    def client(self, timeout: float = 60.0) -> Client:
        return Client(
            self.k.endpoint,
            timeout=timeout,
            retries=0,
            context=zmq.Context.instance(),
            cert=os.path.join(self.keys, "op.key_secret"),
            server_cert=os.path.join(self.keys, "kernel.key"),
        )

    def stop(self, timeout: float = 60.0) -> None:
        try:
            self.k.stop(timeout=timeout)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def kernel_toml(
    keys_dir: str,
    ray: str,
    services: str,
    *,
    host: str = "127.0.0.1",
    heartbeat_s: float = 0.2,
    liveness: int = 25,
    unavailable_wait_s: float = 10.0,
    intensity: int = 10,
    backoff_initial_s: float = 0.2,
) -> str:
    """The kernel config of a Ray test: tcp:// + CURVE on ``host``, ``[ray]`` lines ``ray``, the
    ``[[service]]`` tables ``services`` (TOML text)."""
    return (
        textwrap.dedent(f"""
        [kernel]
        endpoint = "tcp://{host}:0"
        control = "tcp://{host}:0"
        heartbeat_s = {heartbeat_s}
        liveness = {liveness}
        unavailable_wait_s = {unavailable_wait_s}
        [supervisor]
        intensity = {intensity}
        period_s = 600.0
        backoff_initial_s = {backoff_initial_s}
        [auth]
        keys = "{keys_dir}"
        [ray]
    """)
        + textwrap.dedent(ray).strip()
        + "\n"
        + textwrap.dedent(services)
    )


def curve_kernel(config: Any) -> CurveKernel:
    """A kernel on ``config(keys_dir) -> TOML`` with a fresh operator key (``op``)."""
    d = short_tmpdir()
    kd = os.path.join(d, "keys")
    keys.new(kd, "op", "operator")
    try:
        k = KernelProcess.from_config(config(kd))
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return CurveKernel(k, kd, d)
