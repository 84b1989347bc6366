"""System tests: hostile peers against a real ``python -m kernel`` (issue 14, "Why" bullets).

Each test is written against wire behaviour only, and each failed on the kernel before the fix:
claimed routing ids aborted it, a thousand connections under a 1,024 soft limit aborted it, one
message of 100 x 10 MiB held gigabytes, service names and unread replies were never freed.
"""

from __future__ import annotations

import contextlib
import resource
import struct
import sys
import time

import msgpack
import psutil
import pytest
import zmq

from clients import Client, ConnectError
from kernel import errors
from kernel import protocol as P
from tests.support import KernelProcess, kernel_config, service_block

#: [limits] for a flood in the shared default job: queued requests spend its wall_ms (issue 13:
#: every request, opaque MDP included, runs in a finite default job), and 20,000 queued at once
#: would exhaust the shipped hour in well under a second, which is enforcement, not the bound
#: these tests measure (docs/limits.md).
ROOMY_LIMITS = """
[limits]
root = { wall_ms = 1e13, cpu_ms = 1e13, tokens = 1e13, flops = 1e18, vm_steps = 1e13 }
default = { wall_ms = 1e12, cpu_ms = 1e12, tokens = 1e12, flops = 1e17, vm_steps = 1e12 }
"""

pytestmark = pytest.mark.system

#: libzmq's ROUTER generates ``00 <uint32>`` ids counting up from libc's first unseeded rand().
UNSEEDED_FIRST_ID = 0x6B8B4567


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


@contextlib.contextmanager
def dealers(ctx: zmq.Context, endpoint: str, n: int, ids=None):
    socks = []
    try:
        for k in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if ids is not None:
                s.setsockopt(zmq.ROUTING_ID, ids[k])
            s.connect(endpoint)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close(0)


def first_replies(socks: list[zmq.Socket], within_s: float, enough=None) -> list[list[bytes]]:
    """The first reply of each socket that answers within ``within_s`` seconds in all, or fewer
    once ``enough(replies so far)`` says so."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    out: list[list[bytes]] = []
    end = time.monotonic() + within_s
    while len(out) < len(socks) and time.monotonic() < end and not (enough is not None and enough(out)):
        for s, _ in poller.poll(100):
            out.append(s.recv_multipart())
            poller.unregister(s)
    return out


def wait_for_echo(k: KernelProcess) -> None:
    with Client(k.endpoint, timeout=10, retries=0) as c:
        c.wait_for_service("echo", 20)


def raw_mmi_service(ctx: zmq.Context, endpoint: str, timeout_ms: int = 5000) -> bytes | None:
    """An honest anonymous peer (no routing id of its own) asks mmi.service; its answer or None."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"mmi.service", b"echo"])
        return s.recv_multipart()[-1] if s.poll(timeout_ms) else None
    finally:
        s.close(0)


def test_claimed_routing_ids_cannot_abort_the_kernel(zctx):
    """A peer claims the ids the ROUTER would generate next, then honest peers connect."""
    zctx.set(zmq.MAX_SOCKETS, 4096)
    with KernelProcess(service_block("echo", "services.echo")) as k:
        wait_for_echo(k)
        for _ in range(100):  # honest anonymous calls first, as in the report
            assert raw_mmi_service(zctx, k.endpoint) == b"200"
        # Blind claims: the unseeded sequence from its start, covering the 100 calls above, the
        # service's own connections and the next 300 honest ones.
        ids = [b"\x00" + struct.pack(">I", UNSEEDED_FIRST_ID + n) for n in range(600)]
        with dealers(zctx, k.endpoint, len(ids), ids) as hostile:
            for s in hostile:
                s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"mmi.service", b"echo"])
            for s in hostile:  # every claim is connected (answered) before honest peers come
                assert s.poll(10_000)
            for _ in range(300):
                assert raw_mmi_service(zctx, k.endpoint) == b"200"
        assert k.proc.poll() is None


def test_a_thousand_connections_under_a_1024_soft_limit(zctx):
    """The kernel starts under the usual soft limit of 1,024 and raises it to the hard limit."""
    zctx.set(zmq.MAX_SOCKETS, 4096)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"hard descriptor limit {hard} < 4096: cannot show the raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        k = KernelProcess(service_block("echo", "services.echo"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        wait_for_echo(k)
        assert psutil.Process(k.pid).rlimit(psutil.RLIMIT_NOFILE)[0] > 1024
        with dealers(zctx, k.endpoint, 1100) as socks:
            for s in socks:
                s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"mmi.service", b"echo"])
            answered = sum(1 for s in socks if s.poll(10_000) and s.recv_multipart()[-1] == b"200")
            assert answered == len(socks)
        assert k.proc.poll() is None
    finally:
        k.stop()


def test_peer_cap_refuses_clearly_and_survives_a_flood(zctx):
    """At ``max_peers`` the kernel stops accepting, and a connection accepted past the cap has its
    request answered ``overloaded`` naming the cap; a flood ten times past it never aborts the
    kernel nor drops its connected peers, and a new honest client is served once it ends."""
    zctx.set(zmq.MAX_SOCKETS, 4096)
    with KernelProcess(service_block("echo", "services.echo"), heartbeat=0.5,
                       kernel_extra={"max_peers": 40}) as k:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            before = c.stats()["connections"]["peers"]  # this client and the echo worker
            with dealers(zctx, k.endpoint, 400) as socks:
                for s in socks:
                    s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"mmi.service", b"echo"])
                # Until a refusal is among the replies, or the kernel has stopped accepting and
                # every connection under the cap has its answer: then no more can be served
                # (bounded: 400 connections on a busy machine take a while).
                def decided(out: list[list[bytes]]) -> bool:
                    if any(r[-1] != b"200" for r in out):
                        return True
                    return len(out) >= 40 - before and not c.stats()["connections"]["accepting"]  # all "200"

                replies = first_replies(socks, within_s=30, enough=decided)
                replies += [s.recv_multipart() for s in socks if s.poll(0)]  # whatever else is already here
                stats = c.stats()["connections"]
            # At the cap the kernel stops accepting; a connection libzmq accepted before that took
            # effect is over the cap and refused with an answer. How many fall in that window is
            # the machine's timing (none at all happens under load), so either is right -- but
            # nothing past the cap is ever served.
            refused = [errors.from_wire(msgpack.unpackb(r[-1])["error"]) for r in replies if r[-1] != b"200"]
            assert len(replies) - len(refused) <= 40, "more peers served than the cap allows"
            assert all(isinstance(e, errors.Overloaded) and "at most 40" in e.message for e in refused)
            assert stats["peers_refused"] >= len(refused) and stats["peer_cap"] == 40
            assert stats["accept_pauses"] >= 1, "the flood reached the cap but the kernel never stopped accepting"
        # The flood is gone: once the kernel has seen its 400 disconnects (bounded wait; on a
        # loaded machine that takes a moment) an honest new client is served.
        deadline, answer = time.monotonic() + 30, None
        while answer is None:
            with Client(k.endpoint, timeout=10, retries=5) as again:
                try:
                    answer = again.call("echo", {"after": 1})
                except (errors.Overloaded, ConnectError):  # at the cap the ipc:// socket is hidden
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # polling the kernel's peer count, bounded above
        assert answer == {"after": 1}
        assert k.proc.poll() is None


def test_oversized_multi_frame_messages_cost_no_gigabytes(zctx):
    """100 x 10 MiB, 30 x 1 MiB and 500 tiny frames: each refused, the kernel's peak RSS stays
    small and its workers are not dropped for missed heartbeats."""
    with KernelProcess(service_block("echo", "services.echo"), heartbeat=0.2, liveness=10) as k:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            lost_before = c.stats()["counters"].get("workers_lost", 0)
            big = b"\x00" * (10 << 20)
            with dealers(zctx, k.endpoint, 3) as (s1, s2, s3):
                s1.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] + [big] * 100, copy=False)
                s2.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] + [b"y" * (1 << 20)] * 30)
                s3.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] + [b"z"] * 500)
                for s in (s2, s3):
                    assert s.poll(10_000)
                    status = msgpack.unpackb(s.recv_multipart()[-1])
                    assert status["error"]["code"] == "bad_request"
                assert not s1.poll(500)  # dropped by libzmq at its first frame: no answer
                assert c.call("echo", "after") == "after"
            counters = c.stats()["counters"]
            assert counters.get("oversized_messages", 0) >= 2
            assert counters.get("workers_lost", 0) == lost_before
            assert peak_rss_mb(k.pid) < 300


def test_service_name_floods_and_stats_stay_small(zctx):
    """20,000 distinct service names: bounded state, expiry, and a small, paged mmi.stats."""
    config = kernel_config(service_block("echo", "services.echo"), heartbeat=0.5, unavailable_wait=0.2) + ROOMY_LIMITS
    with KernelProcess.from_config(config) as k:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            rss_before = psutil.Process(k.pid).memory_info().rss
            got = 0
            with dealers(zctx, k.endpoint, 1) as (s,):
                for batch in range(40):
                    for n in range(500):
                        s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, f"flood{batch}.{n}".encode(), b"x"])
                    while got < 500 * (batch + 1) and s.poll(10_000):
                        s.recv_multipart()
                        got += 1
            assert got == 20_000  # every one answered (unavailable)
            stats = c.stats()
            assert stats["summary"]["services"] <= P.MAX_WORKERLESS_SERVICES + 1
            assert len(stats["services"]) <= P.STATS_PAGE
            assert len(msgpack.packb(stats)) < 200_000
            assert c.call("echo", "still") == "still"
            assert psutil.Process(k.pid).memory_info().rss - rss_before < 50e6


def test_a_client_that_never_reads_holds_bounded_memory(zctx):
    """20,000 replies of 4 KiB to a peer that never reads: the kernel keeps a bounded queue for
    it (the rest is dropped and counted, or the peer is dropped past its per-connection byte
    budgets, docs/limits.md) and serves everyone else."""
    config = kernel_config(service_block("echo", "services.echo", replicas=2), heartbeat=0.5) + ROOMY_LIMITS
    with KernelProcess.from_config(config) as k:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            rss_before = psutil.Process(k.pid).memory_info().rss
            with dealers(zctx, k.endpoint, 1) as (s,):
                s.setsockopt(zmq.SNDHWM, 0)
                body = b"r" * 4096
                for _ in range(20_000):
                    s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo", body])
                # Until the kernel has settled what reached it: every request answered or, from a
                # dropped peer, discarded (a drop also loses what was still on its way), nothing
                # left queued or running -- polled from the kernel's own counts, bounded.
                deadline = time.monotonic() + 60
                seen, last = -1, None
                while time.monotonic() < deadline:
                    time.sleep(0.5)
                    stats = c.stats()
                    echo = stats["services"]["echo"]
                    now_seen = echo["finals"] + echo["errors"] + stats["peer_budgets"].get("discarded", 0)
                    if now_seen == seen and echo["queued"] == 0 and echo["inflight"] == 0:
                        last = stats
                        break
                    seen = now_seen
                assert last is not None, "the kernel did not settle within the bound"
                b = last["peer_budgets"]
                echo = last["services"]["echo"]
                assert echo["finals"] > 0 and echo["finals"] + echo["errors"] > 1000  # served, then answered
                assert last["counters"].get("send_would_block", 0) > 0 or b["dropped_in"] + b["dropped_out"] > 0
                assert c.call("echo", "served") == "served"
                # Bounds: queued bodies (MAX_QUEUED_BYTES, 32 MiB) and 1,000 messages per pipe.
                assert psutil.Process(k.pid).memory_info().rss - rss_before < 64e6


def test_mmi_restart_brings_back_a_given_up_child(tmp_path):
    flag = tmp_path / "healthy"
    script = (f"import os, sys, time\nif not os.path.exists({str(flag)!r}): sys.exit(3)\n"
              "time.sleep(600)")
    crasher = service_block("crash", command=[sys.executable, "-c", script])
    with KernelProcess(service_block("echo", "services.echo") + crasher, intensity=2, period=30) as k:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)

            def state() -> dict:
                return {ch["name"]: ch for ch in c.stats()["children"]}["crash"]

            deadline = time.monotonic() + 20
            while state()["state"] != "given_up" and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the supervisor's own state, bounded
            assert state()["state"] == "given_up"
            flag.write_text("ok")
            assert c.mmi(P.MMI_RESTART, {"child": "crash"})["ok"]
            deadline = time.monotonic() + 20
            while state()["state"] != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            now = state()
            assert now["state"] == "running" and psutil.pid_exists(now["pid"]), now
            with pytest.raises(errors.Refused):
                c.mmi(P.MMI_RESTART, {"child": "crash"})  # running: nothing to bring back
