"""``python -m bench fairshare``: an honest principal's latency while another principal floods
the same service with a priority-1000 backlog (issue 23: before, the honest client got 0 answers
in 20 s).

A kernel over ``tcp://`` with CURVE keys for two clients, ``alice`` and ``bob``, and one echo
worker (one slot).  ``bob`` sends one request at a time (a 5 ms busy step) and times each answer:
first on a quiet service, then while ``alice`` keeps ``BACKLOG`` priority-1000 requests of the same
size queued (refilled as they are answered).  The slots are shared across principals by deficit
round robin (kernel/fairq.py), so bob waits at most one of alice's requests per round: the target
is bob's flooded p99 <= 2 x his quiet p99.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import threading
import time

import zmq

from bench._common import Result, percentile, progress
from clients import Client
from clients.launch import LocalKernel, service_block, short_tmpdir
from kernel import keys

#: headline metric -> the strongest peer it is measured against (the report's headline table)
HEADLINE = {"flooded_over_quiet_p99": "the honest client's quiet p99 in the same run (no backlog)"}
STEP_MS = 5
BACKLOG = 50
SAMPLES = 300


def _client(kern: LocalKernel, kd: str, name: str) -> Client:
    return Client(
        kern.endpoint,
        timeout=60,
        retries=0,
        context=zmq.Context.instance(),
        cert=os.path.join(kd, f"{name}.key_secret"),
        server_cert=os.path.join(kd, "kernel.key"),
    )


def _bob(c: Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.call("echo", {"steps": 1, "step_ms": STEP_MS})
        out.append(time.perf_counter() - t0)
    return out


def _flood(kern: LocalKernel, kd: str, stop: threading.Event, sent: list[int]) -> None:
    """alice: keep BACKLOG priority-1000 requests in flight until ``stop`` (one event loop, one
    AsyncClient, BACKLOG tasks each sending its next request when the last is answered)."""
    import asyncio

    from clients.aio import AsyncClient

    async def main() -> None:
        async with AsyncClient(
            kern.endpoint,
            timeout=60,
            retries=0,
            cert=os.path.join(kd, "alice.key_secret"),
            server_cert=os.path.join(kd, "kernel.key"),
        ) as c:

            async def one() -> None:
                while not stop.is_set():
                    await c.call("echo", {"steps": 1, "step_ms": STEP_MS}, priority=1000)
                    sent[0] += 1

            await asyncio.gather(*(one() for _ in range(BACKLOG)))

    asyncio.run(main())


def run(quick: bool) -> Result:
    samples = 20 if quick else SAMPLES
    d = short_tmpdir("reca-fair-")
    kd = os.path.join(d, "keys")
    for name, role in (("op", "operator"), ("alice", "client"), ("bob", "client")):
        keys.new(kd, name, role)
    config = textwrap.dedent(f"""
        [kernel]
        endpoint = "tcp://127.0.0.1:0"
        control = "tcp://127.0.0.1:0"
        decision_log = "{{runtime}}/decisions.jsonl"
        [auth]
        keys = "{kd}"
        [limits]
        root = {{ wall_ms = 1e9, cpu_ms = 1e9, tokens = 1e9, flops = 1e15, vm_steps = 1e12 }}
        default = {{ wall_ms = 1e8, cpu_ms = 1e8, tokens = 1e8, flops = 1e14, vm_steps = 1e10 }}
    """) + service_block("echo", "services.echo")
    kern = LocalKernel(config)
    stop = threading.Event()
    sent = [0]
    try:
        with _client(kern, kd, "bob") as bob:
            bob.wait_for_service("echo", 60)
            _bob(bob, 10)  # warm
            progress("fairshare", f"quiet: {samples} requests")
            quiet = _bob(bob, samples)
            flood = threading.Thread(target=_flood, args=(kern, kd, stop, sent), daemon=True)
            flood.start()
            time.sleep(1.0)  # alice's backlog is queued
            progress("fairshare", f"flooded by alice's priority-1000 backlog of {BACKLOG}: {samples} requests")
            flooded = _bob(bob, samples)
            stop.set()
            flood.join(30)
    finally:
        stop.set()
        kern.stop()
        shutil.rmtree(d, ignore_errors=True)
    q99, f99 = percentile(quiet, 99) * 1e3, percentile(flooded, 99) * 1e3
    progress("fairshare", f"bob p99 quiet {q99:.1f} ms, flooded {f99:.1f} ms ({f99 / q99:.2f}x); alice sent {sent[0]}")
    return Result(
        metrics={
            "quiet_p50_ms": percentile(quiet, 50) * 1e3,
            "quiet_p99_ms": q99,
            "flooded_p50_ms": percentile(flooded, 50) * 1e3,
            "flooded_p99_ms": f99,
            "flooded_over_quiet_p99": f99 / q99,
            "alice_requests": float(sent[0]),
        },
        samples={"quiet_p99_ms": len(quiet), "flooded_p99_ms": len(flooded), "flooded_over_quiet_p99": len(flooded)},
        targets={"flooded_over_quiet_p99": ("<=", 2.0)},
        notes=[
            f"one echo worker (one slot), {STEP_MS} ms steps; alice keeps {BACKLOG} priority-1000 requests "
            "queued; bob sends one at a time at the default priority; tcp:// with CURVE keys"
        ],
    )
