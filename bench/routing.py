"""``python -m bench routing``: round trip and pipelined throughput through the kernel, side by
side with a bare pyzmq ROUTER broker (no protocol), the majortomo MDP broker, and Ray actors.

Every system runs one broker process and one echo worker process; the client is this process
and uses a raw DEALER socket for every broker (so client-library cost is equal), plus a row for
reca's own blocking ``Client``.  The reca worker is the real service runtime (services.echo)
declaring 64 request slots, so the kernel can stream requests to it; the other workers take one
request at a time as their protocols require.  Payload: a small msgpack body.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import zmq

from bench._common import Result, percentile
from kernel import codec
from kernel import protocol as P

BODY = codec.pack({"x": 1, "y": "payload"})


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix="reca-bench-", dir="/tmp")

    def start(self, *argv: str, nice: int = 0) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.getcwd(), RECA_LOG_LEVEL="WARNING")
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


def _measure(sock: zmq.Socket, frames: list[bytes], n_sync: int, n_pipe: int, window: int) -> dict:
    """Sync round trips (p50/p99) then pipelined throughput with ``window`` in flight."""
    for _ in range(200):  # warm up
        sock.send_multipart(frames)
        if not sock.poll(10_000):
            raise TimeoutError("no reply during warm-up")
        sock.recv_multipart()
    lat = []
    for _ in range(n_sync):
        t = time.perf_counter()
        sock.send_multipart(frames)
        sock.recv_multipart()
        lat.append(time.perf_counter() - t)
    sent = got = 0
    t0 = time.perf_counter()
    while got < n_pipe:
        while sent < n_pipe and sent - got < window:
            sock.send_multipart(frames)
            sent += 1
        if not sock.poll(10_000):
            raise TimeoutError("pipelined replies stalled")
        sock.recv_multipart()
        got += 1
        while sock.poll(0):
            sock.recv_multipart()
            got += 1
    rate = n_pipe / (time.perf_counter() - t0)
    return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "pipelined_per_s": rate}


def _wait_ready(sock: zmq.Socket, frames: list[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send_multipart(frames)
        if sock.poll(500):
            sock.recv_multipart()
            while sock.poll(300):
                sock.recv_multipart()
            return
    raise TimeoutError("peer did not come up")


def bench_reca(n_sync: int, n_pipe: int, window: int) -> tuple[dict, dict]:
    procs = Procs()
    ep = f"ipc://{procs.dir}/kernel.sock"
    try:
        procs.start("-m", "kernel", "--no-services", "--endpoint", ep)
        procs.start("-m", "services.echo", "--endpoint", ep, "--capacity", "64")
        ctx = zmq.Context()
        s = _dealer(ctx, ep)
        frames = [P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack({"v": 1, "id": 1}), BODY]
        _wait_ready(s, frames)
        raw = _measure(s, frames, n_sync, n_pipe, window)
        s.close(0)
        from clients import Client

        lat = []
        with Client(ep, context=ctx) as c:
            for _ in range(200):
                c.call("echo", {"x": 1})
            for _ in range(n_sync):
                t = time.perf_counter()
                c.call("echo", {"x": 1, "y": "payload"})
                lat.append(time.perf_counter() - t)
        lib = {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3}
        ctx.term()
        return raw, lib
    finally:
        procs.close()


def _bench_peer(name: str, frames: list[bytes], n_sync: int, n_pipe: int, window: int) -> dict:
    """One peer broker (``bench._peers`` roles ``<name>-broker`` / ``<name>-worker``) measured
    with a raw DEALER sending ``frames``."""
    procs = Procs()
    ep = f"ipc://{procs.dir}/{name}.sock"
    try:
        procs.start("-m", "bench._peers", f"{name}-broker", ep)
        procs.start("-m", "bench._peers", f"{name}-worker", ep)
        ctx = zmq.Context()
        s = _dealer(ctx, ep)
        _wait_ready(s, frames)
        out = _measure(s, frames, n_sync, n_pipe, window)
        s.close(0)
        ctx.term()
        return out
    finally:
        procs.close()


def bench_bare(n_sync: int, n_pipe: int, window: int) -> dict:
    return _bench_peer("bare", [BODY], n_sync, n_pipe, window)


def bench_majortomo(n_sync: int, n_pipe: int, window: int) -> dict:
    return _bench_peer("mt", [b"", P.MDPC, P.MajortomoClientCmd.REQUEST.value, b"echo", BODY], n_sync, n_pipe, window)


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
        return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3, "pipelined_per_s": rate}
    finally:
        ray.shutdown()


def run(quick: bool) -> Result:
    n_sync, n_pipe, window = (2000, 20_000, 64) if quick else (10_000, 100_000, 64)
    bare = bench_bare(n_sync, n_pipe, window)
    reca, reca_client = bench_reca(n_sync, n_pipe, window)
    mt = bench_majortomo(n_sync, n_pipe, window)
    ray_r = None if quick else bench_ray(min(n_sync, 3000), min(n_pipe, 20_000), window)
    rows = [
        {"system": "bare pyzmq broker", **bare},
        {"system": "reca kernel (raw socket)", **reca},
        {"system": "reca kernel (reca Client)", **reca_client},
        {"system": "majortomo broker", **mt},
    ]
    if ray_r:
        rows.append({"system": "Ray 2.60 actor", **ray_r})
    metrics = {
        "reca_p50_ms": reca["p50_ms"],
        "reca_p99_ms": reca["p99_ms"],
        "reca_pipelined_per_s": reca["pipelined_per_s"],
        "bare_p50_ms": bare["p50_ms"],
        "majortomo_p50_ms": mt["p50_ms"],
        "p50_vs_bare": reca["p50_ms"] / bare["p50_ms"],
        "p50_vs_majortomo": reca["p50_ms"] / mt["p50_ms"],
        "pipelined_vs_bare": reca["pipelined_per_s"] / bare["pipelined_per_s"],
    }
    targets = {"p50_vs_bare": ("<=", 1.2), "p50_vs_majortomo": ("<=", 1.0), "pipelined_vs_bare": (">=", 0.8)}
    notes = []
    if ray_r:
        metrics["pipelined_vs_ray"] = reca["pipelined_per_s"] / ray_r["pipelined_per_s"]
        targets["pipelined_vs_ray"] = (">=", 10.0)
    else:
        notes.append("Ray not measured (--quick, or ray not installed)")
    return Result(metrics=metrics, targets=targets, table=rows, notes=notes)
