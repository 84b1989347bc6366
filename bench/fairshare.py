"""``python -m bench fairshare``: an honest principal's latency while another principal floods
the same service with a priority-1000 backlog (issue 23: before, the honest client got 0 answers
in 20 s).

A kernel over ``tcp://`` with CURVE keys for two clients, ``alice`` and ``bob``, and one echo
worker (one slot).  ``bob`` sends one request at a time (a 5 ms busy step) and times each answer:
first on a quiet service, then while ``alice`` keeps ``BACKLOG`` priority-1000 requests of the same
size queued (refilled as they are answered).  The slots are shared across principals by deficit
round robin (kernel/fairq.py), so bob waits at most one of alice's requests per round: the target
is bob's flooded p99 <= 2 x his quiet p99.

Quiet and flooded samples are taken in alternating blocks (``BLOCKS`` of each), so load that comes
and goes on the machine (a previous benchmark's processes still exiting, another tenant) falls on
both alike; alice's flood is paused and drained before each quiet block and refilled (and given
``SETTLE_S``) before each flooded block.
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
SAMPLES = 1000  # per phase and run: a p99 from >= 1,000 samples
BLOCKS = 10  # quiet and flooded blocks alternate, SAMPLES // BLOCKS samples each
SETTLE_S = 0.5  # after alice's backlog is refilled, before a flooded block


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


class _Flood:
    """alice: while ``go`` is set, keep BACKLOG priority-1000 requests in flight (one event loop,
    one AsyncClient, BACKLOG tasks each sending its next request when the last is answered); while
    it is clear, send nothing.  ``inflight`` counts her requests not yet answered."""

    def __init__(self, kern: LocalKernel, kd: str) -> None:
        self.kern, self.kd = kern, kd
        self.go, self.stop = threading.Event(), threading.Event()
        self.sent = self.inflight = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import asyncio

        from clients.aio import AsyncClient

        async def main() -> None:
            async with AsyncClient(
                self.kern.endpoint,
                timeout=60,
                retries=0,
                cert=os.path.join(self.kd, "alice.key_secret"),
                server_cert=os.path.join(self.kd, "kernel.key"),
            ) as c:

                async def one() -> None:
                    while not self.stop.is_set():
                        if not self.go.is_set():
                            await asyncio.sleep(0.005)
                            continue
                        self.inflight += 1
                        try:
                            await c.call("echo", {"steps": 1, "step_ms": STEP_MS}, priority=1000)
                        finally:
                            self.inflight -= 1
                        self.sent += 1

                await asyncio.gather(*(one() for _ in range(BACKLOG)))

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by wait(): a dead flood must not read as a quiet one
            self.error = e

    def wait(self, cond, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.error is not None:
                raise RuntimeError(f"alice's flood failed: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"alice's flood: {what} not reached in {timeout:.0f} s")
            time.sleep(0.005)

    def on(self) -> None:
        self.go.set()
        self.wait(lambda: self.inflight >= BACKLOG, "a full backlog")
        time.sleep(SETTLE_S)

    def off(self) -> None:
        self.go.clear()
        self.wait(lambda: self.inflight == 0, "a drained backlog")

    def close(self) -> None:
        self.go.clear()
        self.stop.set()
        self.thread.join(30)


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
    quiet: list[float] = []
    flooded: list[float] = []
    block = max(1, samples // BLOCKS)
    flood = None
    try:
        with _client(kern, kd, "bob") as bob:
            bob.wait_for_service("echo", 60)
            _bob(bob, 10)  # warm
            flood = _Flood(kern, kd)
            progress("fairshare", f"{samples} quiet and {samples} flooded requests in alternating blocks of {block}")
            while len(quiet) < samples:
                quiet += _bob(bob, min(block, samples - len(quiet)))
                flood.on()
                flooded += _bob(bob, min(block, samples - len(flooded)))
                flood.off()
    finally:
        if flood is not None:
            flood.close()
        kern.stop()
        shutil.rmtree(d, ignore_errors=True)
    sent = [flood.sent if flood is not None else 0]
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
            "queued; bob sends one at a time at the default priority; tcp:// with CURVE keys",
            f"quiet and flooded samples alternate in blocks of {block} ({samples} each per run): alice's backlog is "
            f"drained before a quiet block and refilled, then {SETTLE_S} s of settling, before a flooded block",
        ],
    )
