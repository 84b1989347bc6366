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

    def start(self, *argv: str, nice: int = 0) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.getcwd(), RECA_LOG_LEVEL="WARNING", RECA_RUNTIME_DIR=self.dir)
        pre = (lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)) if nice else None
        p = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=pre)
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


def start_reca(procs: Procs, capacity: int) -> tuple[str, list[int]]:
    """A reca kernel and echo worker; (endpoint, [kernel pid, worker pid])."""
    ep = f"ipc://{procs.dir}/kernel{capacity}.sock"
    k = procs.start("-m", "kernel", "--no-services", "--endpoint", ep)
    w = procs.start("-m", "services.echo", "--endpoint", ep, "--capacity", str(capacity))
    return ep, [k.pid, w.pid]


def start_peer(procs: Procs, name: str, module: str = "bench._peers") -> tuple[str, list[int]]:
    """A peer broker and worker (``module``'s roles ``<name>-broker`` / ``<name>-worker``)."""
    ep = f"ipc://{procs.dir}/{name}.sock"
    b = procs.start("-m", module, f"{name}-broker", ep)
    w = procs.start("-m", module, f"{name}-worker", ep)
    return ep, [b.pid, w.pid]


def pure_core(n: int, *flags: str) -> dict:
    """The pure core's CPU per budgeted request (bench._core_loop; ``--session``: the worker
    session's), in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "bench._core_loop", str(n), *flags], capture_output=True, text=True,
                         timeout=600, check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
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


def measure_interleaved(systems: dict[str, tuple[tuple[str, list[int]], list[bytes]]], n_sync: int, n_pipe: int,
                        window: int, chunks: int = 10) -> dict[str, dict]:
    """Every system up at once; sync round trips and pipelined bursts measured in ``chunks``
    round-robin slices, so load that comes and goes on the machine hits every system alike.
    Also the CPU the broker and the worker process spend per request in the pipelined phase."""
    ctx = zmq.Context()
    socks = {k: (_dealer(ctx, ep), frames) for k, ((ep, _), frames) in systems.items()}
    pids = {k: p for k, ((_, p), _) in systems.items()}
    try:
        for sock, frames in socks.values():
            _wait_ready(sock, frames)
        lat = {k: [] for k in socks}
        secs = dict.fromkeys(socks, 0.0)
        for _ in range(chunks):
            for k, (sock, frames) in socks.items():
                lat[k] += _sync(sock, frames, n_sync // chunks)
        cpu0 = {k: [_cpu_s(p) for p in pids[k]] for k in socks}
        for _ in range(chunks):
            for k, (sock, frames) in socks.items():
                secs[k] += _pipelined(sock, frames, n_pipe // chunks, window)
        cpu1 = {k: [_cpu_s(p) for p in pids[k]] for k in socks}
        n = (n_pipe // chunks) * chunks
        return {k: {"p50_ms": percentile(lat[k], 50) * 1e3, "p99_ms": percentile(lat[k], 99) * 1e3,
                    "pipelined_per_s": n / secs[k],
                    "broker_cpu_us_per_req": (cpu1[k][0] - cpu0[k][0]) / n * 1e6,
                    "worker_cpu_us_per_req": (cpu1[k][1] - cpu0[k][1]) / n * 1e6, "_lat": lat[k]} for k in socks}
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


def run(quick: bool) -> Result:
    n_sync, n_pipe, window = (200, 1000, 64) if quick else (10_000, 50_000, 64)  # quick: a smoke run
    procs = Procs()
    try:
        eps = {SYSTEMS[0][0]: (start_peer(procs, "proxy", "bench._proxy"), [BODY]),
               SYSTEMS[1][0]: (start_peer(procs, "bare"), [BODY]),
               SYSTEMS[2][0]: (start_peer(procs, "bare1"), [BODY]),
               SYSTEMS[3][0]: (start_peer(procs, "mt"), MT_FRAMES),
               SYSTEMS[4][0]: (start_reca(procs, 1), RECA_FRAMES),
               SYSTEMS[5][0]: (start_peer(procs, "bare64"), [BODY]),
               SYSTEMS[6][0]: (start_reca(procs, 64), RECA_FRAMES)}
        got = measure_interleaved(eps, n_sync, n_pipe, window)
        lib = reca_client_latency(eps[SYSTEMS[4][0]][0][0], n_sync)
    finally:
        procs.close()
    ray_r = None if quick else bench_ray(min(n_sync, 3000), min(n_pipe, 20_000), window)
    core = pure_core(10_240 if quick else 51_200)
    session = pure_core(10_240 if quick else 51_200, "--session")
    rows = []
    for label, cap in SYSTEMS:
        r = got[label]
        rows.append({"system": label, "worker capacity": cap, "sync samples": len(r["_lat"]),
                     **{k: v for k, v in r.items() if not k.startswith("_")}})
    rows.append({"system": "reca kernel, reca's blocking Client", "worker capacity": 1, "sync samples": len(lib["_lat"]),
                 "p50_ms": lib["p50_ms"], "p99_ms": lib["p99_ms"]})
    if ray_r:
        got[RAY] = ray_r
        rows.append({"system": RAY, "worker capacity": 1, "sync samples": len(ray_r["_lat"]),
                     **{k: v for k, v in ray_r.items() if not k.startswith("_")}})
    rows.append({"system": "reca pure core in process (router + admission + ledger + decision log, no sockets)",
                 "worker capacity": 64, "core_cpu_us_per_req": core["cpu_us_per_req"],
                 "core_cpu_us_per_req_best_round": core["min_round_cpu_us"]})
    rows.append({"system": "reca worker session in process (kernel.worker: REQUEST in, FINAL out, no sockets)",
                 "worker capacity": 64, "core_cpu_us_per_req": session["cpu_us_per_req"],
                 "core_cpu_us_per_req_best_round": session["min_round_cpu_us"]})
    r1, r64 = got[SYSTEMS[4][0]], got[SYSTEMS[6][0]]
    proxy, floor, b1, mt, b64 = (got[SYSTEMS[i][0]] for i in (0, 1, 2, 3, 5))
    for row in rows:
        if "p50_ms" in row:
            row["p50 vs bare credit 1"] = row["p50_ms"] / b1["p50_ms"]
    metrics = {
        "reca_p50_ms": r1["p50_ms"],
        "reca_p99_ms": r1["p99_ms"],
        "bare_p50_ms": b1["p50_ms"],
        "majortomo_p50_ms": mt["p50_ms"],
        "p50_vs_bare": r1["p50_ms"] / b1["p50_ms"],
        "p50_vs_majortomo": r1["p50_ms"] / mt["p50_ms"],
        "reca_pipelined_per_s_capacity_1": r1["pipelined_per_s"],
        "reca_pipelined_per_s_capacity_64": r64["pipelined_per_s"],
        "pipelined_vs_bare_capacity_1": r1["pipelined_per_s"] / b1["pipelined_per_s"],
        "pipelined_vs_bare_capacity_64": r64["pipelined_per_s"] / b64["pipelined_per_s"],
        "pipelined_vs_majortomo_capacity_1": r1["pipelined_per_s"] / mt["pipelined_per_s"],
        "pipelined_capacity_64_vs_bare_no_flow_control": r64["pipelined_per_s"] / floor["pipelined_per_s"],
        "kernel_cpu_us_per_req_capacity_64": r64["broker_cpu_us_per_req"],
        "worker_cpu_us_per_req_capacity_64": r64["worker_cpu_us_per_req"],
        "bare_broker_cpu_us_per_req_credit_64": b64["broker_cpu_us_per_req"],
        "majortomo_broker_cpu_us_per_req": mt["broker_cpu_us_per_req"],
        "kernel_cpu_vs_bare_broker_capacity_64": _ratio(r64["broker_cpu_us_per_req"], b64["broker_cpu_us_per_req"]),
        "worker_cpu_vs_bare_worker_capacity_64": _ratio(r64["worker_cpu_us_per_req"], b64["worker_cpu_us_per_req"]),
        "c_proxy_p50_ms": proxy["p50_ms"],
        "c_proxy_pipelined_per_s": proxy["pipelined_per_s"],
        "p50_vs_c_proxy": r1["p50_ms"] / proxy["p50_ms"],
        "pure_core_cpu_us_per_req": core["cpu_us_per_req"],
        "pure_core_cpu_us_per_req_best_round": core["min_round_cpu_us"],
        "worker_session_cpu_us_per_req": session["cpu_us_per_req"],
    }
    samples = {"reca_p99_ms": len(r1["_lat"]), "reca_p50_ms": len(r1["_lat"])}
    # Issue 22's targets.
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
             "broker/worker_cpu_us_per_req: user + system CPU of the broker (kernel) and worker process during "
             "the pipelined phase, per request (/proc, clock-tick resolution): where reca's time goes",
             "libzmq C proxy: zmq.proxy between a ROUTER and a DEALER, echo worker on a DEALER (bench/_proxy.py); "
             "its 'broker' CPU is libzmq's own I/O threads' plus the proxy loop's",
             "pure core: bench/_core_loop.py in a fresh process; one worker of capacity 64, requests in turns of 64 "
             "(one loop turn), each a budgeted ledger decision logged as binary records (default fsync policy), one "
             "flush per turn; process CPU per request over all rounds, and the best 1024-request round"]
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
