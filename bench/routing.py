"""``python -m bench routing``: round trip and pipelined throughput through the kernel, side by
side with libzmq's C proxy (``zmq.proxy``: the floor for one ZeroMQ hop), a bare pyzmq ROUTER
broker (no protocol), the majortomo MDP broker, and Ray actors; and the CPU the kernel's pure core
(router + admission + ledger + decision log, in process, no sockets) spends per request.

Every system runs one broker process and one echo worker process; the client is this process
and uses a raw DEALER socket for every broker (so client-library cost is equal), plus a row for
reca's own blocking ``Client``.  Systems are compared at equal worker capacity (requests
outstanding at the worker): capacity 1 (bare broker with credit 1, majortomo, reca worker
declaring 1 slot) and capacity 64 (bare broker with credit 64, reca worker declaring 64 slots).
A bare broker with no flow control at all is the floor.  The reca worker is the real service
runtime (services.echo).  Payload: a small msgpack body.

CPU per request is read around each system's own slices (:func:`measure_interleaved`), so a
process's idle CPU while the other systems are measured is not charged to its requests; the idle
CPU itself is its own figure (``*_idle_cpu_pct``), and the figure read once around the whole phase
is kept (``*_whole_phase``).

Extra reca arms, measured interleaved with the others in the same run (a before/after side by
side; the un-suffixed metrics and the targets stay this tree's pure-Python path):

- ``RECA_BENCH_BASELINE=DIR``: a kernel and echo worker from the source tree DIR (cwd and
  PYTHONPATH DIR, this interpreter) at capacity 1 and 64, and the pure core of DIR's kernel under
  this tree's driver; metrics suffixed ``_baseline``;
- ``RECA_BENCH_COMPILED=DIR``: the same from this tree with ``RECA_COMPILED=DIR`` (a compiled
  core's build directory) in the processes' environment; metrics suffixed ``_compiled``.

The plain arms never inherit a ``RECA_COMPILED`` from the bench's environment.  The notes name the
tree and commit each arm ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from collections.abc import Callable

import zmq

from bench._common import Result, cdf_plot, line_plot, percentile
from kernel import codec
from kernel import protocol as P

BODY = codec.pack({"x": 1, "y": "payload"})


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix="reca-bench-", dir="/tmp")

    def start(self, *argv: str, nice: int = 0, tree: str | None = None,
              env: dict[str, str | None] | None = None, runtime: str | None = None) -> subprocess.Popen:
        """``python ARGV`` with this interpreter, cwd and PYTHONPATH ``tree`` (default: the current
        directory); ``env`` overrides the inherited environment (None removes a variable);
        ``runtime``: its RECA_RUNTIME_DIR (default: this run's directory)."""
        tree = tree or os.getcwd()
        full = dict(os.environ, PYTHONPATH=tree, RECA_LOG_LEVEL="WARNING", RECA_RUNTIME_DIR=runtime or self.dir)
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        pre = (lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)) if nice else None
        p = subprocess.Popen([sys.executable, *argv], env=full, cwd=tree, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=pre)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(endpoint)
    return s


def _sync(sock: zmq.Socket, frames: list[bytes], n: int) -> list[float]:
    """``n`` round trips, one in flight; seconds each."""
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        sock.send_multipart(frames)
        if not sock.poll(10_000):
            raise TimeoutError("no reply within 10 s")
        sock.recv_multipart()
        lat.append(time.perf_counter() - t)
    return lat


def _pipelined(sock: zmq.Socket, frames: list[bytes], n: int, window: int) -> float:
    """Seconds for ``n`` requests with ``window`` in flight."""
    sent = got = 0
    t0 = time.perf_counter()
    while got < n:
        while sent < n and sent - got < window:
            sock.send_multipart(frames)
            sent += 1
        if not sock.poll(10_000):
            raise TimeoutError("pipelined replies stalled")
        sock.recv_multipart()
        got += 1
        while sock.poll(0):
            sock.recv_multipart()
            got += 1
    return time.perf_counter() - t0


def _wait_ready(sock: zmq.Socket, frames: list[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send_multipart(frames)
        if sock.poll(500):
            sock.recv_multipart()
            while sock.poll(300):
                sock.recv_multipart()
            _sync(sock, frames, 200)  # warm up
            return
    raise TimeoutError("peer did not come up")


def measure_endpoint(ep: str, frames: list[bytes], n_sync: int, n_pipe: int, window: int,
                     connect: Callable[[zmq.Context, str], zmq.Socket] = _dealer) -> dict:
    """Sync round trips (p50/p99) then pipelined throughput with ``window`` in flight, on a fresh
    socket from ``connect`` once the peer at ``ep`` answers (``bench auth`` uses it with CURVE)."""
    ctx = zmq.Context()
    s = connect(ctx, ep)
    try:
        _wait_ready(s, frames)
        lat = _sync(s, frames, n_sync)
        rate = n_pipe / _pipelined(s, frames, n_pipe, window)
        return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
                "pipelined_per_s": rate, "_lat": lat}
    finally:
        s.close(0)
        ctx.term()


RECA_FRAMES = [P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack({"v": 1, "id": 1}), BODY]
MT_FRAMES = [b"", P.MDPC, P.MajortomoClientCmd.REQUEST.value, b"echo", BODY]


#: The plain arms run the pure-Python core of this tree: a RECA_COMPILED in the bench's own
#: environment is not passed to them (only the compiled arm sets it).
PURE = {"RECA_COMPILED": None}


def start_reca(procs: Procs, capacity: int, tree: str | None = None, env: dict[str, str | None] | None = None,
               tag: str = "") -> tuple[str, list[int]]:
    """A reca kernel and echo worker, both from source tree ``tree`` (default: this one) with
    ``env`` (default :data:`PURE`); (endpoint, [kernel pid, worker pid]).  Each kernel has its own
    runtime directory (its decision log, and the control socket beside its endpoint)."""
    run_dir = os.path.join(procs.dir, f"reca{tag}{capacity}")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    ep = f"ipc://{run_dir}/kernel.sock"
    env = PURE if env is None else env
    k = procs.start("-m", "kernel", "--no-services", "--endpoint", ep, tree=tree, env=env, runtime=run_dir)
    w = procs.start("-m", "services.echo", "--endpoint", ep, "--capacity", str(capacity), tree=tree, env=env,
                    runtime=run_dir)
    return ep, [k.pid, w.pid]


def start_peer(procs: Procs, name: str, module: str = "bench._peers") -> tuple[str, list[int]]:
    """A peer broker and worker (``module``'s roles ``<name>-broker`` / ``<name>-worker``)."""
    ep = f"ipc://{procs.dir}/{name}.sock"
    b = procs.start("-m", module, f"{name}-broker", ep)
    w = procs.start("-m", module, f"{name}-worker", ep)
    return ep, [b.pid, w.pid]


CORE_LOOP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_core_loop.py")


def pure_core(n: int, *flags: str, tree: str | None = None, env: dict[str, str | None] | None = None) -> dict:
    """The pure core's CPU per budgeted request (bench._core_loop; ``--session``: the worker
    session's; ``--queued``: every request queued at a capacity-1 worker), in a fresh process.
    ``tree``: measure that source tree's kernel with this tree's driver; ``env``: overrides
    (default :data:`PURE`)."""
    full = dict(os.environ, PYTHONPATH=tree or os.getcwd())
    for k, v in (PURE if env is None else env).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    # run by path, so ``kernel`` (and nothing of bench/) comes from ``tree``
    argv = ["-c", f"import runpy; runpy.run_path({CORE_LOOP!r}, run_name='__main__')"] if tree else \
        ["-m", "bench._core_loop"]
    out = subprocess.run([sys.executable, *argv, str(n), *flags], capture_output=True, text=True, timeout=600,
                         check=True, env=full, cwd=tree or os.getcwd())
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float:
    """a / b; NaN when ``b`` is not a positive number (a process whose CPU stayed below one clock
    tick of /proc in a --quick run: no ratio, the target reads as missed)."""
    return a / b if b > 0 else float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc; NaN where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


#: A process's CPU at one instant: (thread id -> ns it has run, user ticks, system ticks).
Snap = tuple[dict[int, int], int, int]


def _snap(pid: int) -> Snap:
    """Every live thread's run time (``/proc/PID/task/*/schedstat``, first field: ns, the
    scheduler's own count, no tick sampling; libzmq's I/O thread included) and the process's
    user and system clock ticks (``/proc/PID/stat``: all threads, exited ones too)."""
    ns: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                ns[int(tid)] = int(fh.read().split(None, 1)[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread exited between the listing and the read
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        user, system = int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        user = system = 0
    return ns, user, system


_TICK = os.sysconf("SC_CLK_TCK")


def _spent(a: Snap, b: Snap) -> tuple[float, float, float]:
    """CPU seconds between two snapshots: (run time of the threads, user, system).  A thread that
    started in between counts from 0; one that exited in between counts nothing (its last
    part is lost, never a negative figure); a thread id reused in between counts as new."""
    before = a[0]
    run = 0
    for tid, v in b[0].items():
        old = before.get(tid, 0)
        run += v - old if v >= old else v
    return run / 1e9, (b[1] - a[1]) / _TICK, (b[2] - a[2]) / _TICK


class _Meter:
    """CPU of one system's processes summed over the slices it is read around (:meth:`start`,
    :meth:`stop`): its own work, not the time it sat idle while other systems were measured."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.total = [[0.0, 0.0, 0.0] for _ in pids]  # per process: run, user, system seconds
        self._at: list[Snap] = []

    def start(self) -> None:
        self._at = [_snap(p) for p in self.pids]

    def stop(self) -> None:
        for tot, a, p in zip(self.total, self._at, self.pids):
            for i, x in enumerate(_spent(a, _snap(p))):
                tot[i] += x


def measure_idle(pids: dict[str, list[int]], seconds: float) -> dict[str, list[float]]:
    """% of one core each process uses over the same quiet window of ``seconds`` (nothing sent):
    system -> [broker %, worker %]."""
    a = {k: [_snap(p) for p in ps] for k, ps in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: [_spent(s, _snap(p))[0] / wall * 100 for s, p in zip(a[k], ps)] for k, ps in pids.items()}


def measure_interleaved(systems: dict[str, tuple[tuple[str, list[int]], list[bytes]]], n_sync: int, n_pipe: int,
                        window: int, chunks: int = 10, idle_s: float = 3.0) -> dict[str, dict]:
    """Every system up at once; sync round trips and pipelined bursts measured in ``chunks``
    round-robin slices, so load that comes and goes on the machine hits every system alike.

    Also the CPU the broker and the worker process spend per request, read around each system's
    own slices and summed (``*_cpu_us_per_req``: thread run time from schedstat; ``*_user_*``,
    ``*_sys_*``: the split in clock ticks), in the pipelined and (``*_sync``) the sync phase;
    ``*_whole_phase``: the figure read once around the whole pipelined phase (user + system
    ticks), which also charges a system's idle time while the others ran (the method before
    issue 22); ``*_idle_cpu_pct``: % of a core over ``idle_s`` seconds with every system up and
    idle, before the sync phase."""
    ctx = zmq.Context()
    socks = {k: (_dealer(ctx, ep), frames) for k, ((ep, _), frames) in systems.items()}
    pids = {k: p for k, ((_, p), _) in systems.items()}
    try:
        for sock, frames in socks.values():
            _wait_ready(sock, frames)
        time.sleep(min(0.5, idle_s))  # the last warm-up's after-effects settle
        idle = measure_idle(pids, idle_s)
        lat: dict[str, list[float]] = {k: [] for k in socks}
        secs = dict.fromkeys(socks, 0.0)
        sync = {k: _Meter(pids[k]) for k in socks}
        pipe = {k: _Meter(pids[k]) for k in socks}
        for _ in range(chunks):
            for k, (sock, frames) in socks.items():
                sync[k].start()
                lat[k] += _sync(sock, frames, n_sync // chunks)
                sync[k].stop()
        cpu0 = {k: [_cpu_s(p) for p in pids[k]] for k in socks}
        for _ in range(chunks):
            for k, (sock, frames) in socks.items():
                pipe[k].start()
                secs[k] += _pipelined(sock, frames, n_pipe // chunks, window)
                pipe[k].stop()
        cpu1 = {k: [_cpu_s(p) for p in pids[k]] for k in socks}
        n = (n_pipe // chunks) * chunks
        ns = (n_sync // chunks) * chunks
        out = {}
        for k in socks:
            (b_run, b_user, b_sys), (w_run, w_user, w_sys) = pipe[k].total
            out[k] = {"p50_ms": percentile(lat[k], 50) * 1e3, "p99_ms": percentile(lat[k], 99) * 1e3,
                      "pipelined_per_s": n / secs[k],
                      "broker_cpu_us_per_req": b_run / n * 1e6, "worker_cpu_us_per_req": w_run / n * 1e6,
                      "broker_user_us_per_req": b_user / n * 1e6, "broker_sys_us_per_req": b_sys / n * 1e6,
                      "worker_user_us_per_req": w_user / n * 1e6, "worker_sys_us_per_req": w_sys / n * 1e6,
                      "broker_cpu_us_per_req_whole_phase": (cpu1[k][0] - cpu0[k][0]) / n * 1e6,
                      "worker_cpu_us_per_req_whole_phase": (cpu1[k][1] - cpu0[k][1]) / n * 1e6,
                      "broker_cpu_us_per_req_sync": sync[k].total[0][0] / ns * 1e6,
                      "worker_cpu_us_per_req_sync": sync[k].total[1][0] / ns * 1e6,
                      "broker_idle_cpu_pct": idle[k][0], "worker_idle_cpu_pct": idle[k][1], "_lat": lat[k]}
        return out
    finally:
        for sock, _ in socks.values():
            sock.close(0)
        ctx.term()


def reca_client_latency(endpoint: str, n_sync: int) -> dict:
    """Sync round trips through reca's own blocking Client."""
    from clients import Client

    lat = []
    with Client(endpoint) as c:
        for _ in range(200):
            c.call("echo", {"x": 1})
        for _ in range(n_sync):
            t = time.perf_counter()
            c.call("echo", {"x": 1, "y": "payload"})
            lat.append(time.perf_counter() - t)
    return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "_lat": lat}


def bench_ray(n_sync: int, n_pipe: int, window: int) -> dict | None:
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        @ray.remote
        class Echo:
            def echo(self, x):
                return x

        a = Echo.remote()
        for _ in range(200):
            ray.get(a.echo.remote(BODY))
        lat = []
        for _ in range(n_sync):
            t = time.perf_counter()
            ray.get(a.echo.remote(BODY))
            lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        pending = []
        done = 0
        while done < n_pipe:
            while len(pending) < window and done + len(pending) < n_pipe:
                pending.append(a.echo.remote(BODY))
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            done += len(ready)
        rate = n_pipe / (time.perf_counter() - t0)
        return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "pipelined_per_s": rate,
                "_lat": lat}
    finally:
        ray.shutdown()


SYSTEMS = (  # label, worker capacity
    ("libzmq C proxy (zmq.proxy), no flow control", "unbounded"),
    ("bare pyzmq broker, no flow control (floor)", "unbounded"),
    ("bare pyzmq broker, credit 1", 1),
    ("majortomo MDP broker", 1),
    ("reca kernel, worker capacity 1", 1),
    ("bare pyzmq broker, credit 64", 64),
    ("reca kernel, worker capacity 64", 64),
)
RAY = "Ray actor (max_concurrency 1, calls queued at the actor)"
#: The report's headline rows: each metric against the strongest peer it is measured against.
HEADLINE = {
    "p50_vs_bare": "a bare pyzmq ROUTER broker with credit flow control (sync p50, same run)",
    "pipelined_vs_bare_capacity_64": "the same bare broker at equal worker capacity 64 (pipelined requests/s)",
    "kernel_cpu_vs_bare_broker_capacity_64": "the bare broker's CPU per request (credit 64, same run)",
    "p50_vs_majortomo": "majortomo, a Python MDP broker (sync p50, same run)",
}


#: Extra reca arms, each from an environment variable naming a directory (unset: no arm):
#: variable -> (metric suffix, label prefix, what the directory is).
ARMS = {
    "RECA_BENCH_BASELINE": ("_baseline", "reca kernel @ baseline", "another source tree (kernel and services.echo "
                                                                   "from there, same interpreter)"),
    "RECA_BENCH_COMPILED": ("_compiled", "reca kernel (compiled core)", "a compiled core's build directory "
                                                                      "(passed to the processes as RECA_COMPILED)"),
}


def _arms() -> list[tuple[str, str, str | None, dict[str, str | None]]]:
    """(suffix, label prefix, tree, env) of every arm: this tree's pure path first, then the
    ones asked for in the environment (:data:`ARMS`)."""
    arms: list[tuple[str, str, str | None, dict[str, str | None]]] = [("", "reca kernel", None, PURE)]
    base = os.environ.get("RECA_BENCH_BASELINE")
    if base:
        if not os.path.isdir(os.path.join(base, "kernel")):
            raise ValueError(f"RECA_BENCH_BASELINE={base!r} is not a source tree (no kernel/ in it)")
        arms.append(("_baseline", ARMS["RECA_BENCH_BASELINE"][1], os.path.abspath(base), PURE))
    compiled = os.environ.get("RECA_BENCH_COMPILED")
    if compiled:
        if not os.path.isdir(compiled):
            raise ValueError(f"RECA_BENCH_COMPILED={compiled!r} is not a directory")
        arms.append(("_compiled", ARMS["RECA_BENCH_COMPILED"][1], None, {"RECA_COMPILED": os.path.abspath(compiled)}))
    return arms


def _commit(tree: str | None) -> str:
    """``git rev-parse`` of a source tree, with ``+dirty`` for uncommitted changes to tracked files."""
    tree = tree or os.getcwd()
    try:
        head = subprocess.run(["git", "-C", tree, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git tree)"
    return head + ("+dirty" if dirty else "")


def _reca_metrics(sfx: str, r1: dict, r64: dict, peers: dict[str, dict]) -> dict[str, float]:
    """One reca arm's figures against the peers (``sfx``: the arm's metric suffix)."""
    b1, b64, mt = peers["b1"], peers["b64"], peers["mt"]
    m = {
        "reca_p50_ms": r1["p50_ms"],
        "reca_p99_ms": r1["p99_ms"],
        "p50_vs_bare": r1["p50_ms"] / b1["p50_ms"],
        "p50_vs_majortomo": r1["p50_ms"] / mt["p50_ms"],
        "reca_pipelined_per_s_capacity_1": r1["pipelined_per_s"],
        "reca_pipelined_per_s_capacity_64": r64["pipelined_per_s"],
        "pipelined_vs_bare_capacity_1": r1["pipelined_per_s"] / b1["pipelined_per_s"],
        "pipelined_vs_bare_capacity_64": r64["pipelined_per_s"] / b64["pipelined_per_s"],
        "pipelined_vs_majortomo_capacity_1": r1["pipelined_per_s"] / mt["pipelined_per_s"],
        "pipelined_capacity_64_vs_bare_no_flow_control": r64["pipelined_per_s"] / peers["floor"]["pipelined_per_s"],
        "kernel_cpu_us_per_req_capacity_64": r64["broker_cpu_us_per_req"],
        "worker_cpu_us_per_req_capacity_64": r64["worker_cpu_us_per_req"],
        "kernel_cpu_vs_bare_broker_capacity_64": _ratio(r64["broker_cpu_us_per_req"], b64["broker_cpu_us_per_req"]),
        "worker_cpu_vs_bare_worker_capacity_64": _ratio(r64["worker_cpu_us_per_req"], b64["worker_cpu_us_per_req"]),
        "kernel_cpu_us_per_req_capacity_1": r1["broker_cpu_us_per_req"],
        "kernel_cpu_vs_bare_broker_capacity_1": _ratio(r1["broker_cpu_us_per_req"], b1["broker_cpu_us_per_req"]),
        "kernel_cpu_us_per_req_sync": r1["broker_cpu_us_per_req_sync"],
        "kernel_cpu_vs_bare_broker_sync": _ratio(r1["broker_cpu_us_per_req_sync"], b1["broker_cpu_us_per_req_sync"]),
        "worker_cpu_us_per_req_sync": r1["worker_cpu_us_per_req_sync"],
        "kernel_idle_cpu_pct": r64["broker_idle_cpu_pct"],
        "worker_idle_cpu_pct": r64["worker_idle_cpu_pct"],
        "p50_vs_c_proxy": r1["p50_ms"] / peers["proxy"]["p50_ms"],
    }
    if not sfx:  # this tree's pure path: the split and the old method's figure too
        m |= {
            "kernel_user_us_per_req_capacity_64": r64["broker_user_us_per_req"],
            "kernel_sys_us_per_req_capacity_64": r64["broker_sys_us_per_req"],
            "worker_user_us_per_req_capacity_64": r64["worker_user_us_per_req"],
            "worker_sys_us_per_req_capacity_64": r64["worker_sys_us_per_req"],
            "kernel_cpu_us_per_req_capacity_64_whole_phase": r64["broker_cpu_us_per_req_whole_phase"],
            "worker_cpu_us_per_req_capacity_64_whole_phase": r64["worker_cpu_us_per_req_whole_phase"],
            "kernel_cpu_vs_bare_broker_capacity_64_whole_phase": _ratio(r64["broker_cpu_us_per_req_whole_phase"],
                                                                        b64["broker_cpu_us_per_req_whole_phase"]),
            "worker_cpu_vs_bare_worker_capacity_64_whole_phase": _ratio(r64["worker_cpu_us_per_req_whole_phase"],
                                                                        b64["worker_cpu_us_per_req_whole_phase"]),
        }
    return {k + sfx: v for k, v in m.items()}


def run(quick: bool) -> Result:
    n_sync, n_pipe, window = (200, 1000, 64) if quick else (10_000, 50_000, 64)  # quick: a smoke run
    idle_s = 1.0 if quick else 3.0
    arms = _arms()
    procs = Procs()
    try:
        eps = {SYSTEMS[0][0]: (start_peer(procs, "proxy", "bench._proxy"), [BODY]),
               SYSTEMS[1][0]: (start_peer(procs, "bare"), [BODY]),
               SYSTEMS[2][0]: (start_peer(procs, "bare1"), [BODY]),
               SYSTEMS[3][0]: (start_peer(procs, "mt"), MT_FRAMES),
               SYSTEMS[4][0]: (start_reca(procs, 1), RECA_FRAMES),
               SYSTEMS[5][0]: (start_peer(procs, "bare64"), [BODY]),
               SYSTEMS[6][0]: (start_reca(procs, 64), RECA_FRAMES)}
        systems = list(SYSTEMS)
        for sfx, prefix, tree, env in arms[1:]:
            for cap in (1, 64):
                label = f"{prefix}, worker capacity {cap}"
                eps[label] = (start_reca(procs, cap, tree, env, tag=sfx), RECA_FRAMES)
                systems.append((label, cap))
        got = measure_interleaved(eps, n_sync, n_pipe, window, idle_s=idle_s)
        lib = reca_client_latency(eps[SYSTEMS[4][0]][0][0], n_sync)
    finally:
        procs.close()
    ray_r = None if quick else bench_ray(min(n_sync, 3000), min(n_pipe, 20_000), window)
    n_core = 10_240 if quick else 51_200
    cores = {sfx: {"core": pure_core(n_core, tree=tree, env=env),
                   "queued": pure_core(n_core, "--queued", tree=tree, env=env),
                   "session": pure_core(n_core, "--session", tree=tree, env=env)} for sfx, _, tree, env in arms}
    rows = []
    for label, cap in systems:
        r = got[label]
        rows.append({"system": label, "worker capacity": cap, "sync samples": len(r["_lat"]),
                     **{k: v for k, v in r.items() if not k.startswith("_")}})
    rows.append({"system": "reca kernel, reca's blocking Client", "worker capacity": 1, "sync samples": len(lib["_lat"]),
                 "p50_ms": lib["p50_ms"], "p99_ms": lib["p99_ms"]})
    if ray_r:
        got[RAY] = ray_r
        rows.append({"system": RAY, "worker capacity": 1, "sync samples": len(ray_r["_lat"]),
                     **{k: v for k, v in ray_r.items() if not k.startswith("_")}})
    for sfx, prefix, _, _ in arms:
        at = prefix[len("reca kernel"):]  # "", " @ baseline", " (compiled core)"
        c = cores[sfx]
        for key, what, cap in (
                ("core", "pure core in process (router + admission + ledger + decision log, no sockets)", 64),
                ("queued", "pure core in process, capacity-1 worker: every request queued, then dispatched", 1),
                ("session", "worker session in process (kernel.worker: REQUEST in, FINAL out, no sockets)", 64)):
            rows.append({"system": f"reca{at} {what}", "worker capacity": cap,
                         "core_cpu_us_per_req": c[key]["cpu_us_per_req"],
                         "core_cpu_us_per_req_best_round": c[key]["min_round_cpu_us"]})
    peers = {"proxy": got[SYSTEMS[0][0]], "floor": got[SYSTEMS[1][0]], "b1": got[SYSTEMS[2][0]],
             "mt": got[SYSTEMS[3][0]], "b64": got[SYSTEMS[5][0]]}
    proxy, b1, mt, b64 = peers["proxy"], peers["b1"], peers["mt"], peers["b64"]
    r1, r64 = got[SYSTEMS[4][0]], got[SYSTEMS[6][0]]
    for row in rows:
        if "p50_ms" in row:
            row["p50 vs bare credit 1"] = row["p50_ms"] / b1["p50_ms"]
    core, queued, session = cores[""]["core"], cores[""]["queued"], cores[""]["session"]
    metrics = {
        **_reca_metrics("", r1, r64, peers),
        "bare_p50_ms": b1["p50_ms"],
        "majortomo_p50_ms": mt["p50_ms"],
        "bare_broker_cpu_us_per_req_credit_64": b64["broker_cpu_us_per_req"],
        "bare_worker_cpu_us_per_req_credit_64": b64["worker_cpu_us_per_req"],
        "bare_broker_cpu_us_per_req_credit_64_whole_phase": b64["broker_cpu_us_per_req_whole_phase"],
        "bare_broker_cpu_us_per_req_credit_1": b1["broker_cpu_us_per_req"],
        "bare_broker_cpu_us_per_req_sync": b1["broker_cpu_us_per_req_sync"],
        "majortomo_broker_cpu_us_per_req": mt["broker_cpu_us_per_req"],
        "bare_broker_idle_cpu_pct": b64["broker_idle_cpu_pct"],
        "bare_worker_idle_cpu_pct": b64["worker_idle_cpu_pct"],
        "majortomo_broker_idle_cpu_pct": mt["broker_idle_cpu_pct"],
        "c_proxy_p50_ms": proxy["p50_ms"],
        "c_proxy_pipelined_per_s": proxy["pipelined_per_s"],
        "pure_core_cpu_us_per_req": core["cpu_us_per_req"],
        "pure_core_cpu_us_per_req_best_round": core["min_round_cpu_us"],
        "pure_core_queued_cpu_us_per_req": queued["cpu_us_per_req"],
        "worker_session_cpu_us_per_req": session["cpu_us_per_req"],
    }
    for sfx, prefix, _, _ in arms[1:]:
        metrics |= _reca_metrics(sfx, got[f"{prefix}, worker capacity 1"], got[f"{prefix}, worker capacity 64"], peers)
        metrics |= {f"pure_core_cpu_us_per_req{sfx}": cores[sfx]["core"]["cpu_us_per_req"],
                    f"pure_core_queued_cpu_us_per_req{sfx}": cores[sfx]["queued"]["cpu_us_per_req"],
                    f"worker_session_cpu_us_per_req{sfx}": cores[sfx]["session"]["cpu_us_per_req"]}
    samples = {"reca_p99_ms": len(r1["_lat"]), "reca_p50_ms": len(r1["_lat"])}
    # Issue 22's targets (on this tree's pure-Python path, the reference).
    targets = {"p50_vs_bare": ("<=", 1.5), "p50_vs_majortomo": ("<=", 1.0),
               "pipelined_vs_bare_capacity_1": (">=", 0.5), "pipelined_vs_bare_capacity_64": (">=", 0.5),
               "kernel_cpu_vs_bare_broker_capacity_64": ("<=", 1.5),
               "worker_cpu_vs_bare_worker_capacity_64": ("<=", 1.5), "pure_core_cpu_us_per_req": ("<=", 15.0)}
    notes = [f"one broker process and one echo worker process per system, all up at once and measured in 10 "
             f"round-robin slices; client = this process with a raw DEALER socket for every broker; {n_sync} "
             f"sync round trips, then {n_pipe} requests with {window} in flight",
             "worker capacity = requests outstanding at the worker: reca's worker declares it (--capacity), the "
             "bare broker enforces it by credit, majortomo's MDP worker takes one request at a time; the "
             "no-flow-control bare broker pushes everything to the worker's socket (the floor)",
             "p50_vs_bare and the p50 targets use the capacity-1 systems (sync round trips have one request in flight)",
             "broker/worker_cpu_us_per_req (and kernel_/worker_/bare_broker_cpu_us_per_req_*, the CPU ratios): CPU "
             "of the broker (kernel) and worker process per request, read around each system's own pipelined "
             "slices and summed (/proc/PID/task/*/schedstat: run time of every thread, libzmq's I/O thread "
             "included, ns), so a system's idle time while the others are measured is not charged to its "
             "requests (since issue 22); *_user_/*_sys_us_per_req: the same slices' user/system split "
             "(/proc/PID/stat, clock ticks); *_sync: the same around the sync slices (one request in flight)",
             "*_whole_phase: user + system ticks read once around the whole pipelined phase (the method before "
             "issue 22): it also charges a system's idle CPU while the other systems run",
             f"broker/worker_idle_cpu_pct: % of one core over the same {idle_s:g} s window, every system up and "
             f"idle, before the sync phase; kernel_/worker_idle_cpu_pct: the capacity-64 reca system's",
             "libzmq C proxy: zmq.proxy between a ROUTER and a DEALER, echo worker on a DEALER (bench/_proxy.py); "
             "its 'broker' CPU is libzmq's own I/O threads' plus the proxy loop's",
             "pure core: bench/_core_loop.py in a fresh process; one worker of capacity 64, requests in turns of 64 "
             "(one loop turn), each a budgeted ledger decision logged as binary records (default fsync policy), one "
             "flush per turn; process CPU per request over all rounds, and the best 1024-request round; "
             "pure_core_queued (--queued): the same with a capacity-1 worker that always holds one request, so "
             "every request queues (queue + dispatch decisions); no target"]
    for sfx, prefix, tree, env in arms:
        what = f"source tree {tree or os.getcwd()} at {_commit(tree)}"
        if env.get("RECA_COMPILED"):
            what += f", RECA_COMPILED={env['RECA_COMPILED']}"
        else:
            what += ", pure Python (RECA_COMPILED unset)"
        notes.append(f"arm '{prefix}' (metrics{' suffix ' + sfx if sfx else ' without a suffix'}): {what}")
    if os.environ.get("RECA_COMPILED"):
        notes.append("RECA_COMPILED was set in the bench's environment: not passed to the plain arms "
                     "(RECA_BENCH_COMPILED adds a compiled arm)")
    if ray_r:
        metrics["pipelined_capacity_1_vs_ray"] = r1["pipelined_per_s"] / ray_r["pipelined_per_s"]
        metrics["pipelined_capacity_64_vs_ray"] = r64["pipelined_per_s"] / ray_r["pipelined_per_s"]
    else:
        notes.append("Ray not measured (--quick, or ray not installed)")
    plots = [cdf_plot("rtt_cdf", "sync round trip, one request in flight", "ms",
                      {k: [x * 1e3 for x in v["_lat"]] for k, v in got.items()}),
             line_plot("pipelined", "pipelined throughput, 64 in flight", "system", "requests / s",
                       {"requests/s": ([r["system"].split(",")[0] + f" [{r['worker capacity']}]" for r in rows
                                        if "pipelined_per_s" in r],
                                       [r["pipelined_per_s"] for r in rows if "pipelined_per_s" in r])},
                       style="bar")]
    return Result(metrics=metrics, targets=targets, table=rows, notes=notes, samples=samples, plots=plots)
