"""Ray placement: a ``[[service]]`` with ``placement = "ray"`` runs its replicas as Ray actors.

The kernel stays the one place that decides.  Ray only *hosts* the processes: each replica is one
:class:`ServiceAgent` actor, which runs the ordinary service runtime (``python -m services.X``)
as a child process on its node and is that child's node-side agent (stop, freeze, kill, CPU
measurement).  The service connects to the kernel over ``tcp://`` with CURVE like any remote
peer; the kernel routes, budgets and preempts it like a local one.

Keys (docs/cluster.md): the actor generates the replica's CURVE key pair *on its node*
(``zmq.curve_keypair``), writes the secret into a private (0700) directory there for its child, and
returns only the **public** key to the kernel, which authorises it as the principal
``child:NAME`` with role ``service:BASE`` for as long as that actor lives (revoked when it is
replaced).  No secret key ever travels through Ray (no task argument, no object store entry).

Supervision stays the supervisor's (kernel/supervisor.py): :class:`RayPlacement.spawn` returns a
:class:`RemoteProcess` that looks to it like a local child (``pid``, ``returncode``, ``wait()``);
a dead actor or a lost node ends ``wait()`` with a status (``-SIGKILL`` for a lost actor/node),
and the supervisor restarts it with its back-off and intensity.  A cluster that cannot be reached
makes ``spawn`` raise :class:`PlacementUnavailable` with the reason: that service is reported
unavailable (status ``reason``), the rest of reca runs.

Pure parts (no Ray): :class:`RayResources`, :func:`parse_label`, :func:`remote_endpoint`.
The shell (:class:`RayCluster`, :class:`RayPlacement`) imports ``ray`` lazily: a kernel without a
Ray-placed service never imports it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

log = logging.getLogger("reca.rayplace")

__all__ = [
    "ACTOR_START_TIMEOUT_S",
    "CPU_POLL_S",
    "CONNECT_TIMEOUT_S",
    "PlacementUnavailable",
    "RayCluster",
    "RayClusterConfig",
    "RayPlacement",
    "RayResources",
    "RemoteProcess",
    "free_ports",
    "make_token",
    "node_argv",
    "parse_label",
    "remote_endpoint",
    "start_node",
    "stop_node",
    "token_env",
]

#: Longest wait for ``ray.init`` to reach (or start) the cluster, seconds.
CONNECT_TIMEOUT_S = 60.0
#: Longest wait for an actor to be scheduled, enrol and start its service, seconds.
ACTOR_START_TIMEOUT_S = 90.0
#: How often the kernel reads each replica's CPU seconds measured on its node.
CPU_POLL_S = 1.0
#: ... and how often while the ladder holds a request the kernel answered on it (a tombstone: the
#: ladder freezes a worker once its CPU shows it burning, so a reading a second old would delay
#: the freeze by up to a second; :meth:`RemoteProcess.hurry`).
URGENT_POLL_S = 0.02
#: How long one :meth:`RemoteProcess.hurry` keeps the fast polling, seconds.
HURRY_S = 2.0
#: Longest wait for one agent call (signal, CPU read), seconds.
AGENT_CALL_TIMEOUT_S = 10.0
#: Longest the node agent waits for a freeze to be reported landed, seconds.  Shorter than the
#: ladder's ``kill_grace`` (1 s by default, kernel/ladder.py): a freeze that cannot land lets the
#: agent's SIGSTOP fallback and the thaw, then the ladder's kill, come in time -- the agent's orders
#: run one at a time (:meth:`ServiceAgent.signal`), so a thaw or a kill waits at most this long
#: behind a freeze.  (It was the enforcer's FREEZE_TIMEOUT, 1 s: a thaw could wait a whole kill
#: grace.)
NODE_FREEZE_TIMEOUT_S = 0.2
#: How many of the latest agent round trips (the CPU reads) :attr:`RemoteProcess.rtt` keeps.
RTT_KEEP = 10
#: The Ray resource label key a ``ray_label = "VALUE"`` selects on (``ray start --labels reca-node=VALUE``).
LABEL_KEY = "reca-node"
#: Lines of the service's output the agent keeps (the last names why it exited).
TAIL_LINES = 20


class PlacementUnavailable(RuntimeError):
    """The Ray cluster cannot host the replica now (unreachable, no node fits); the message is the
    reason status shows."""


# -- pure parts ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RayResources:
    """What one replica asks of Ray: CPUs, GPUs, memory (bytes) and a node label."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None
    label: str | None = None

    def options(self) -> dict[str, Any]:
        """``ActorClass.options(...)`` keyword arguments."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            out["memory"] = self.memory
        if self.label:
            key, value = parse_label(self.label)
            out["label_selector"] = {key: value}
        return out


def parse_label(text: str) -> tuple[str, str]:
    """``"VALUE"`` -> (LABEL_KEY, VALUE); ``"KEY=VALUE"`` -> (KEY, VALUE).  ValueError if empty."""
    key, sep, value = text.partition("=")
    if not sep:
        key, value = LABEL_KEY, text
    if not key or not value:
        raise ValueError(f"a node label is VALUE or KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def remote_endpoint(endpoint: str, host: str | None) -> str:
    """The kernel endpoint as a Ray node reaches it: ``tcp://H:P`` with H replaced by ``host`` when
    given (or when H is a wildcard/loopback the node could not use); ipc:// is refused."""
    if not endpoint.startswith("tcp://"):
        raise PlacementUnavailable(f"a Ray-placed service needs a tcp:// kernel endpoint, not {endpoint!r}")
    h, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host:
        h = host
    elif h in ("*", "0.0.0.0", "127.0.0.1", "localhost"):
        h = socket.gethostbyname(socket.gethostname()) if h in ("*", "0.0.0.0") else h
    return f"tcp://{h}:{port}"


@dataclasses.dataclass
class RayClusterConfig:
    """``[ray]``: where the cluster is, or how the kernel starts a local one."""

    #: ``HOST:PORT`` of an existing cluster's GCS; None: start a local one (``local = true``).
    address: str | None = None
    local: bool = False
    num_cpus: int = 1
    object_store_bytes: int = 100 * 1024 * 1024
    #: Ray's token file (``RAY_AUTH_TOKEN_PATH``, token authentication on); None: Ray's own default.
    token_path: str | None = None
    #: The address Ray nodes use to reach the kernel (default: the endpoint's host).
    kernel_host: str | None = None
    #: A local cluster's session directory (short: Ray puts unix sockets there).
    temp_dir: str | None = None
    #: Longest wait for the cluster to answer ``ray.init``, seconds (a local head: twice this).
    connect_timeout_s: float = CONNECT_TIMEOUT_S


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` now (bound to 0, read, closed)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def node_argv(
    *,
    head_port: int | None = None,
    address: str | None = None,
    node_ip: str = "127.0.0.1",
    num_cpus: int = 1,
    object_store_bytes: int = 100 * 1024 * 1024,
    temp_dir: str | None = None,
    labels: dict[str, str] | None = None,
) -> list[str]:
    """``ray start ... --block`` for a small node: a head (``head_port``) or a worker joining
    ``address``; every port explicit (free ones picked here, so several clusters share a
    machine), no dashboard, no usage stats.  Kill it by its process group."""
    ports = free_ports(7, "")  # free here; in another namespace any port is
    taken = {*ports[:6], head_port}
    for _ in range(20):  # the worker range must not cover another component's port (Ray refuses)
        if not taken & set(range(ports[6], ports[6] + 41)):
            break
        ports[6] = free_ports(1, "")[0]
    argv = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={node_ip}",
        f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_bytes}",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--min-worker-port={ports[6]}",
        f"--max-worker-port={ports[6] + 40}",
    ]
    if head_port is not None:
        argv += ["--head", f"--port={head_port}", "--include-dashboard=false"]
    else:
        assert address is not None
        argv += [f"--address={address}"]
    if temp_dir is not None and head_port is not None:
        argv.append(f"--temp-dir={temp_dir}")
    if labels:
        argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    return argv


def source_ip(address: str) -> str:
    """The local address this host uses to reach ``HOST:PORT`` (a Ray driver must say which of
    its node's addresses it is on when the cluster is not on its default route)."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port or 1)))  # UDP: no packet is sent
        return str(s.getsockname()[0])


def token_env(token_path: str) -> dict[str, str]:
    """Ray 2.60's token authentication (``RAY_AUTH_MODE=token``, the token read from the file)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


def make_token(path: str) -> str:
    """A new 256-bit token in ``path`` (0600), as ``ray get-auth-token --generate`` makes one."""
    import secrets

    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path


#: Environment of every node reca starts: a loaded machine's Python agents may take longer than
#: the raylet's default wait for their port files (it aborts with "Timed out waiting for file
#: ...dashboard_agent_listen_port"); the node's processes start at nice -10 for their first 90 s
#: (kernel/raynode.py: Ray's hard-coded 30 s raylet registration, missed at load 30+ on 2 cores;
#: skipped where not permitted); no usage statistics are sent.  The caller's environment wins.
NODE_ENV = {
    "RAY_agent_register_timeout_ms": "120000",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RECA_RAYNODE_STARTUP_NICE": "-10",
}


def start_node(
    argv: list[str], env: dict[str, str], *, stderr: Any = subprocess.DEVNULL, prefix: list[str] | None = None
) -> subprocess.Popen:
    """Start a Ray node (``node_argv``) under ``python -m kernel.raynode`` (its subreaper: stopping
    it stops and reaps every Ray process of the node), in a process group of its own.  ``prefix``
    runs it elsewhere (``ip netns exec NS``).  Call from a thread that outlives the node: the
    runner dies with the thread that started it (``PR_SET_PDEATHSIG``)."""
    full = [*(prefix or []), sys.executable, "-m", "kernel.raynode", *argv]
    return subprocess.Popen(
        full,
        env={**NODE_ENV, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
        cwd=_repo_root(),
    )


def stop_node(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the node's runner (it stops and reaps the node), then SIGKILL its group after
    ``timeout``."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


# -- the node agent (a Ray actor) ----------------------------------------------------------------


class ServiceAgent:
    """One replica on its node: makes its key pair there, runs the service as a child process, and
    is that child's node-side agent.  Runs as a threaded Ray actor (``max_concurrency``), so
    ``wait`` can block while ``signal`` and ``cpu_seconds`` are answered."""

    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="reca-ray-")  # 0700 (mkdtemp)
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.cert: str | None = None
        self.public: bytes | None = None
        #: This node's enforcer (kernel/enforce.py: cgroups, else signals) and the service's group.
        self.enforcer: Any = None
        self.group: Any = None
        self.cpu_floor = 0.0  # CPU seconds read before a group was lost (monotone billing)
        #: The agent is a threaded actor: its orders (freeze, thaw, kill) run one at a time, and a
        #: freeze or thaw older than the last one applied is dropped (:meth:`signal`).
        self._order_lock = threading.Lock()
        self.last_order = 0  # the latest order's sequence number (freeze, thaw, kill, ...) applied

    def enrol(self) -> dict[str, Any]:
        """Make the replica's CURVE key pair here; return only its public key and where it runs."""
        import ray
        import zmq

        from kernel import auth

        public, secret = zmq.curve_keypair()
        _, self.cert = auth.write_certificate(self.dir, "replica", self.role, (public, secret))
        self.public = public
        ctx = ray.get_runtime_context()
        return {
            "public": public.decode(),
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(),
            "agent_pid": os.getpid(),
        }

    def _open_enforcer(self, enforce: dict[str, Any]) -> dict[str, Any]:
        """Open this node's enforcer (``reca-<agent pid>`` under the agent's own cgroups, so a
        later agent on the node sweeps it if this one is killed) and the service's group with
        its ceilings; returns ``{backend, reason}``.  A named backend the node lacks raises
        (the replica is reported unavailable with the reason, as a kernel refuses to start)."""
        from kernel import enforce as E

        limits = enforce.get("limits") or {}
        self.enforcer = E.open_enforcer(str(enforce.get("backend", "auto")), name=f"reca-{os.getpid()}")
        self.group = self.enforcer.service(
            self.name, E.Limits(limits.get("mem_bytes"), limits.get("cpu_weight"), limits.get("pids_max"))
        )
        return {"backend": self.enforcer.backend, "reason": self.enforcer.reason}

    def start(
        self, argv: list[str], env: dict[str, str], server_public: str, enforce: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Start the service with its own certificate, in a group of this node's enforcer when
        ``enforce`` is given (``{"backend", "limits": {mem_bytes, cpu_weight, pids_max}}``);
        returns ``{"pid": its pid on this node, "enforcer": {backend, reason} or None}``."""
        from kernel import auth
        from kernel import enforce as E
        from kernel import protocol as P

        facts = self._open_enforcer(enforce) if enforce is not None else None

        server = os.path.join(self.dir, "kernel.key")
        auth.write_public_certificate(server, auth.KERNEL_ROLE, server_public.encode())
        if argv and os.path.basename(argv[0]).startswith("python"):
            argv = [sys.executable, *argv[1:]]  # this node's interpreter
        full = dict(os.environ)
        full.update(env)
        full[P.ENV_CERT] = self.cert or ""
        full[P.ENV_SERVER_CERT] = server
        full[P.ENV_PARENT] = str(os.getpid())  # the service dies with this agent (PR_SET_PDEATHSIG)
        full.setdefault("PYTHONUNBUFFERED", "1")
        full.pop(E.ENV_GROUP, None)
        if self.group is not None:
            full[E.ENV_GROUP] = self.group.handle()  # its helpers (ttc's tool runs) join sub-groups
        self.proc = subprocess.Popen(
            argv,
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.group is not None:
            self.group.sub("main").place_tree(self.proc.pid)  # with any child it forked already
        threading.Thread(target=self._pump, daemon=True).start()
        return {"pid": self.proc.pid, "enforcer": facts}

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode(errors="replace").strip()
            if text:
                self.tail.append(text)

    def wait(self) -> tuple[int, str | None]:
        """Block until the service exits: (status, its last output line)."""
        assert self.proc is not None
        rc = self.proc.wait()
        time.sleep(0.1)  # let the pump read the last line
        return rc, (self.tail[-1] if self.tail else None)

    def signal(self, sig: int, seq: int | None = None, freeze_timeout: float = NODE_FREEZE_TIMEOUT_S) -> bool:
        """The node-side stop.  With an enforcer: SIGSTOP freezes the service's group (its whole
        tree, helpers in other sessions included), SIGCONT thaws it, SIGKILL kills every process
        of it -- as a local child's group; other signals (and without an enforcer, all) go to the
        service's process group.  Returns whether it was carried out.

        Orders run one at a time (the actor answers calls on several threads, in no set order);
        ``seq`` numbers the kernel's orders: a SIGSTOP or SIGCONT numbered below the latest one
        applied is stale and dropped (False) -- a thaw overtaken by the freeze it follows would
        otherwise leave the worker frozen for good.  A freeze waits ``freeze_timeout`` at most
        for the OS to report it (:data:`NODE_FREEZE_TIMEOUT_S`)."""
        with self._order_lock:
            if seq is not None:
                if seq < self.last_order and sig in (signal.SIGSTOP, signal.SIGCONT):
                    log.info(
                        "%s: dropped a stale %s (order %d < %d)",
                        self.name,
                        signal.Signals(sig).name,
                        seq,
                        self.last_order,
                    )
                    return False
                self.last_order = max(self.last_order, seq)  # a kill too: no older freeze after it
            return self._signal(sig, freeze_timeout)

    def _signal(self, sig: int, freeze_timeout: float) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        if self.group is not None and sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGKILL):
            from kernel import enforce as E

            try:
                if sig == signal.SIGSTOP:
                    self.group.freeze(freeze_timeout)
                    return True
                if sig == signal.SIGKILL:
                    self.group.kill()
                    return True
                self.group.thaw()  # and SIGCONT below: a freeze that fell back to SIGSTOP resumes too
            except (E.EnforcerError, OSError):
                pass  # a freeze the OS did not confirm in time, a group gone: the signal below
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def frozen(self) -> bool | None:
        """Whether the service's group is frozen (None without an enforcer)."""
        return None if self.group is None else bool(self.group.frozen())

    def cpu_seconds(self) -> float | None:
        """CPU seconds of the service and its descendants, measured on this node: its group's
        (cgroup accounting counts every process that ever ran in it, reaped ones included), else
        user + system of its live tree (psutil)."""
        import psutil

        if self.proc is None:
            return None
        if self.group is not None:
            try:
                self.cpu_floor = max(self.cpu_floor, float(self.group.cpu_seconds()))
                return self.cpu_floor
            except Exception:  # noqa: BLE001 - the group is gone: the last reading stands
                return self.cpu_floor
        try:
            root = psutil.Process(self.proc.pid)
            total = 0.0
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, ``timeout``, then SIGKILL of the group; the key directory is removed."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                rc = self.proc.wait()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.enforcer is not None:
            self.enforcer.close()  # thaws and kills what the group still holds, removes it
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc

    def __del__(self) -> None:  # the actor is torn down: leave no key (and no group) behind
        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)
        if getattr(self, "enforcer", None) is not None:
            self.enforcer.close()


# -- the kernel-side shell -----------------------------------------------------------------------


def _in_thread(fn: Callable[[], Any]) -> "asyncio.Future[Any]":
    """Run blocking ``fn`` (a Ray call) in a daemon thread of its own: a hung call can be given up
    on (``asyncio.wait_for``) without holding the kernel's shutdown."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="reca-ray-call").start()
    return asyncio.wrap_future(fut)


class RayCluster:
    """The kernel's connection to Ray (it is a Ray driver), made on first use.  Invariant: at most
    one ``ray.init`` in flight; ``reason`` says why the last connection attempt failed."""

    def __init__(self, cfg: RayClusterConfig) -> None:
        self.cfg = cfg
        self.connected = False
        self.reason: str | None = None
        self._lock = asyncio.Lock()
        #: The local head (``ray start --block`` in its own process group), when the kernel started one.
        self.head: subprocess.Popen | None = None
        self._head_address: str | None = None
        self._head_temp = ""

    def _launch_local(self) -> None:
        """Start a one-node cluster (``ray start --head --block`` under kernel.raynode, token
        authentication on).  Runs on the event loop's thread (the node dies with that thread)."""
        if self.head is not None:
            if self.head.poll() is None:
                return  # an earlier attempt's head: still ours
            stop_node(self.head)
            self.head = None
        temp = self.cfg.temp_dir or tempfile.mkdtemp(prefix="rr-")
        os.makedirs(temp, mode=0o700, exist_ok=True)
        if not self.cfg.token_path:
            self.cfg.token_path = make_token(os.path.join(temp, "auth_token"))
        port = free_ports(1)[0]
        argv = node_argv(
            head_port=port, num_cpus=self.cfg.num_cpus, object_store_bytes=self.cfg.object_store_bytes, temp_dir=temp
        )
        env = {**os.environ, **token_env(self.cfg.token_path), "PYTHONPATH": _repo_root()}
        with open(os.path.join(temp, "head.err"), "ab") as err:
            self.head = start_node(argv, env, stderr=err)
        self._head_address = f"127.0.0.1:{port}"
        self._head_temp = temp

    def _wait_local(self) -> str:
        """The local head's address once its GCS port answers."""
        assert self.head is not None and self._head_address is not None
        port = int(self._head_address.rpartition(":")[2])
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise PlacementUnavailable(
                    f"the local Ray head exited ({self.head.returncode}); see {self._head_temp}/head.err"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self._head_address
            except OSError:
                time.sleep(0.5)
        raise PlacementUnavailable(f"the local Ray head did not listen within {CONNECT_TIMEOUT_S:.0f} s")

    def _init(self) -> None:
        address = self.cfg.address or self._wait_local()
        if self.cfg.token_path:  # before Ray is imported: its token loader reads these once
            os.environ.update(token_env(self.cfg.token_path))
        # Each of ray.init's GCS connects bounded (Ray reads these); the whole init is bounded by ensure().
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "20")
        os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "20")
        import ray
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")  # Ray's own way to re-read RAY_AUTH_MODE (authentication_token_setup.py)
        ray.init(
            address=address,
            _node_ip_address=source_ip(address),
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": _repo_root()}},
        )

    async def ensure(self) -> None:
        """Connected, or PlacementUnavailable with the reason."""
        async with self._lock:
            if self.connected:
                return
            if not self.cfg.address and not self.cfg.local:
                raise PlacementUnavailable("no Ray cluster configured: set [ray] address or [ray] local = true")
            try:
                if not self.cfg.address:
                    self._launch_local()
                bound = self.cfg.connect_timeout_s * (1 if self.cfg.address else 2)  # a local head starts first
                await asyncio.wait_for(_in_thread(self._init), bound)
            except asyncio.TimeoutError:
                self.reason = f"Ray cluster {self.cfg.address or 'local'} unreachable: no answer in {bound:.0f} s"
                raise PlacementUnavailable(self.reason) from None
            except Exception as exc:  # noqa: BLE001 - any failure of ray.init is the reason shown
                self.reason = f"Ray cluster {self.cfg.address or 'local'} unreachable: {exc}"[:300]
                raise PlacementUnavailable(self.reason) from exc
            self.connected = True
            self.reason = None
            log.info("connected to Ray cluster %s", self.cfg.address or "(local)")

    def shutdown(self) -> None:
        if self.connected:
            import ray

            ray.shutdown()
            self.connected = False
        if self.head is not None:
            stop_node(self.head)
            self.head = None


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RemoteProcess:
    """A Ray-placed replica as the supervisor sees a child process.  ``pid`` is the service's pid
    on its node (only meaningful there); ``where`` names the node; ``cpu`` is the CPU seconds the
    node last measured (polled every :data:`CPU_POLL_S`)."""

    stdout = None

    def __init__(
        self, actor: Any, info: dict[str, Any], pid: int, principal: str, public: bytes, revoke: Callable[[bytes], None]
    ) -> None:
        self.actor = actor
        self.pid = pid
        self.returncode: int | None = None
        self.last_line: str | None = None
        self.where = {
            "placement": "ray",
            "node_ip": info.get("node_ip"),
            "node_id": info.get("node_id"),
            "host": info.get("host"),
            "agent_pid": info.get("agent_pid"),
            "pid": pid,
            "enforcer": (info.get("enforcer") or {}).get("backend"),
        }
        self.principal = principal
        self.public = public
        self._revoke = revoke
        self.cpu = 0.0
        #: Round trips of the latest agent calls (CPU reads), seconds: how long a thaw or a kill
        #: sent now takes to reach the node (the ladder's answer window for it: answer_grace_of).
        self.rtts: collections.deque[float] = collections.deque(maxlen=RTT_KEEP)
        self._urgent_until = 0.0  # poll every URGENT_POLL_S until then (hurry)
        self._orders = 0  # the latest order's sequence number (the agent drops stale ones)
        self._wake: asyncio.Event | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._poller: asyncio.Task[None] | None = None

    def start_watch(self) -> None:
        self._waiter = asyncio.wrap_future(self.actor.wait.remote().future())
        self._wake = asyncio.Event()
        self._poller = asyncio.get_running_loop().create_task(self._poll_cpu())

    async def _poll_cpu(self) -> None:
        while self.returncode is None:
            t0 = time.monotonic()
            try:
                got = await asyncio.wait_for(
                    asyncio.wrap_future(self.actor.cpu_seconds.remote().future()), AGENT_CALL_TIMEOUT_S
                )
                self.rtts.append(time.monotonic() - t0)
                if got is not None:
                    self.cpu = max(self.cpu, float(got))  # monotone: a lost read never refunds
            except Exception:  # noqa: BLE001 - a dead actor: wait() reports it
                self.rtts.append(time.monotonic() - t0)  # a call that timed out took at least this
            interval = URGENT_POLL_S if time.monotonic() < self._urgent_until else CPU_POLL_S
            if self._wake is None:
                await asyncio.sleep(interval)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass

    def hurry(self, for_s: float = HURRY_S) -> None:
        """Read the replica's CPU every :data:`URGENT_POLL_S` (at once, then as fast as its agent
        answers, at most that often) for the next ``for_s`` seconds: the ladder holds a request
        the kernel answered on it and judges by its CPU whether it still burns."""
        now = time.monotonic()
        urgent = now < self._urgent_until
        self._urgent_until = max(self._urgent_until, now + for_s)
        if not urgent and self._wake is not None:
            self._wake.set()

    async def wait(self) -> int:
        assert self._waiter is not None
        try:
            rc, self.last_line = await self._waiter
        except Exception as exc:  # noqa: BLE001 - RayActorError / node lost: the replica is gone
            rc = -signal.SIGKILL
            self.last_line = f"Ray actor lost ({type(exc).__name__}): {str(exc).splitlines()[0][:200]}"
        self.returncode = rc
        self._finish()
        await self._retire()
        return rc

    async def _retire(self) -> None:
        """The service has exited: the agent removes its group and key directory, then the actor
        ends, so its Ray resources are free for the replacement at once (a dead replica's actor
        held them before: the next placement waited for a CPU nobody used).  Bounded."""
        import ray

        try:
            await asyncio.wait_for(asyncio.wrap_future(self.actor.stop.remote(1.0).future()), AGENT_CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the actor or its node is gone
            pass
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def _finish(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self._revoke(self.public)

    def rtt(self) -> float:
        """The longest of the latest agent round trips, seconds (0.0 before the first)."""
        return max(self.rtts, default=0.0)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the service on its node (sent now, not awaited), numbered: the agent
        carries out orders one at a time and drops a freeze or thaw that arrives after a later
        one (:meth:`ServiceAgent.signal`)."""
        if self.returncode is None:
            self._orders += 1
            self.actor.signal.remote(int(sig), self._orders)

    async def stop(self, timeout: float) -> None:
        """Stop the service (SIGTERM, ``timeout``, SIGKILL) and then the actor."""
        import ray

        if self.returncode is None:
            try:
                await asyncio.wait_for(
                    asyncio.wrap_future(self.actor.stop.remote(timeout).future()), timeout + AGENT_CALL_TIMEOUT_S
                )
            except Exception as exc:  # noqa: BLE001 - gone or hung: the actor is killed below
                log.warning("stopping a Ray replica: %s", exc)
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        if self._waiter is not None and not self._waiter.done():
            try:
                await asyncio.wait_for(self.wait(), AGENT_CALL_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.returncode = -signal.SIGKILL
                self._finish()

    def kill_actor(self) -> None:
        """``ray.kill``: the actor and (through PR_SET_PDEATHSIG) its service die; the supervisor
        restarts it.  The node-side stop when the agent itself does not answer."""
        import ray

        ray.kill(self.actor, no_restart=True)


class RayPlacement:
    """Starts Ray-placed replicas for the supervisor.  ``authorise(principal, role, public)`` and
    ``revoke(public)`` change the kernel's principals; ``server_public`` is the kernel's public
    key (z85); ``endpoint``/``control`` are the kernel's bound endpoints."""

    def __init__(
        self,
        cluster: RayCluster,
        resources: dict[str, RayResources],
        *,
        authorise: Callable[[str, str, bytes], None] | None = None,
        revoke: Callable[[bytes], None] | None = None,
        limits: dict[str, Any] | None = None,
        enforce_backend: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.resources = resources
        self.authorise = authorise
        self.revoke = revoke or (lambda public: None)
        #: Each service's OS ceilings (kernel.enforce.Limits, from its ``[[service]]`` row), set on
        #: its node's group; ``ray_memory_bytes`` is the memory ceiling where ``mem_bytes`` is unset.
        self.limits = limits or {}
        #: The node agents' enforcer backend (``[enforce] backend``); None: no enforcer on nodes.
        self.enforce_backend = enforce_backend
        self.server_public: str | None = None
        self.endpoint: str | None = None
        self.control: str | None = None

    def set_kernel(self, endpoint: str, control: str, server_public: bytes | None) -> None:
        self.endpoint, self.control = endpoint, control
        self.server_public = None if server_public is None else server_public.decode()

    async def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> RemoteProcess:
        """Start replica ``name`` as an actor; PlacementUnavailable with the reason if it cannot."""
        from kernel import auth
        from kernel import protocol as P

        if self.server_public is None or self.authorise is None:
            raise PlacementUnavailable("a Ray-placed service needs a tcp:// kernel with CURVE ([auth] keys)")
        assert self.endpoint is not None and self.control is not None
        host = self.cluster.cfg.kernel_host
        env = dict(env)
        env[P.ENV_ENDPOINT] = remote_endpoint(self.endpoint, host)
        env[P.ENV_CONTROL] = remote_endpoint(self.control, host)
        await self.cluster.ensure()
        import ray

        role = auth.child_principals([name])[name]
        res = self.resources.get(name.split("#", 1)[0], RayResources())
        agent_cls: Any = ray.remote(ServiceAgent)
        try:
            actor: Any = agent_cls.options(max_concurrency=4, max_restarts=0, name=None, **res.options()).remote(
                name, role
            )
            info = await asyncio.wait_for(asyncio.wrap_future(actor.enrol.remote().future()), ACTOR_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            ray.kill(actor, no_restart=True)
            raise PlacementUnavailable(
                f"no Ray node took {name} within {ACTOR_START_TIMEOUT_S:.0f} s (resources {res.options()})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - scheduling/creation failure is the reason shown
            raise PlacementUnavailable(f"Ray could not start {name}: {exc}"[:300]) from exc
        public = info["public"].encode()
        principal = f"{auth.CHILD_PREFIX}{name}"
        self.authorise(principal, role, public)  # before the service can say READY
        enforce = None
        if self.enforce_backend is not None:
            enforce = {"backend": self.enforce_backend, "limits": self.node_limits(name)}
        try:
            started = await asyncio.wait_for(
                asyncio.wrap_future(actor.start.remote(argv, env, self.server_public, enforce).future()),
                ACTOR_START_TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001
            self.revoke(public)
            ray.kill(actor, no_restart=True)
            raise PlacementUnavailable(f"Ray replica {name} did not start its service: {exc}"[:300]) from exc
        pid = int(started["pid"])
        info = {**info, "enforcer": started.get("enforcer")}
        proc = RemoteProcess(actor, info, pid, principal, public, self.revoke)
        proc.start_watch()
        log.info("started %s on Ray node %s (%s) pid %d", name, info.get("node_ip"), info.get("host"), pid)
        return proc

    def node_limits(self, name: str) -> dict[str, int | None]:
        """The ceilings of replica ``name``'s group on its node: its service's ``mem_bytes`` (else
        its ``ray_memory_bytes``), ``cpu_weight``, ``pids_max``."""
        base = name.split("#", 1)[0]
        lim = self.limits.get(name) or self.limits.get(base)
        mem = getattr(lim, "mem_bytes", None) or self.resources.get(base, RayResources()).memory
        return {
            "mem_bytes": mem,
            "cpu_weight": getattr(lim, "cpu_weight", None),
            "pids_max": getattr(lim, "pids_max", None),
        }

    def shutdown(self) -> None:
        self.cluster.shutdown()
