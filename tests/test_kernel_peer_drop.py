"""Per-connection byte budgets against real connections (issue 24, item 3): a client that never
reads its replies, and a slow reader of a stream of partials, are dropped -- typed, logged, their
connection closed -- while other clients are served, and the kernel's resident set comes back.

The budgets are small here (8 MiB out, 1 s grace) so the attacks meet them quickly; every wait
is bounded, and memory is asserted only as a bound with a margin (never a time)."""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from clients import Client
from clients.core import build_header, parse_reply, request_frames
from kernel import codec
from kernel import protocol as P
from tests.support import KernelProcess, kernel_config, service_block

pytestmark = pytest.mark.system

MIB = 1 << 20
#: Three frames just under the 4 MiB frame bound: a 12 MiB request, echoed back as the reply.
FRAME = b"m" * (4 * MIB - 4096)
BIG = [P.MDPC, P.ClientCmd.REQUEST.value, b"echo", FRAME, FRAME, FRAME]
WAIT_S = 60.0  # bound on each wait for the kernel (a loaded machine)

LIMITS = """
[limits]
root = { wall_ms = 1e13, cpu_ms = 1e13, tokens = 1e13, flops = 1e18, vm_steps = 1e13 }
default = { wall_ms = 1e12, cpu_ms = 1e12, tokens = 1e12, flops = 1e17, vm_steps = 1e12 }
"""


def config(transport: str) -> str:
    # The subject is outbound: 3 x 12 MiB requests sent at once are past the default inbound
    # budget (24 MiB) whenever the kernel's loop lags behind them, and would be cut for that first
    # (tests/test_kernel_inbound.py), hence a larger one here.
    extra = {"peer_out_bytes": 8 * MIB, "peer_out_grace_s": 1.0, "peer_in_bytes": 64 * MIB}
    endpoint = None
    auth = ""
    if transport == "tcp":
        endpoint, extra["control"], auth = "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", "\n[auth]\ninsecure = true\n"
    return (
        kernel_config(
            service_block("echo", "services.echo"),
            endpoint=endpoint,
            heartbeat=0.5,
            unavailable_wait=5.0,
            kernel_extra=extra,
        )
        + LIMITS
        + auth
    )


def never_reader(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER that reads nothing: its libzmq takes one message, its OS buffer a few KiB."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    mon = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    s.connect(endpoint)
    return s, mon


def tcp_pair(endpoint: str, mon: zmq.Socket) -> tuple[int, int]:
    """(kernel port, client port) of the never-reader's tcp connection, from its monitor's
    CONNECTED event (whose value is the client's descriptor), bounded."""
    assert mon.poll(WAIT_S * 1000), "the never-reader did not connect"
    ev = recv_monitor_message(mon)
    assert ev["event"] == zmq.EVENT_CONNECTED, ev
    with socket.socket(fileno=os.dup(ev["value"])) as s:
        return int(endpoint.rsplit(":", 1)[1]), s.getsockname()[1]


def tcp_alive(pair: tuple[int, int]) -> bool:
    """Whether the host still has a tcp socket of this connection (either end, any state)."""
    return any(c.laddr and c.raddr and {c.laddr.port, c.raddr.port} == set(pair) for c in psutil.net_connections("tcp"))


def wait_dropped(mon: zmq.Socket, pair: tuple[int, int]) -> None:
    """Until the kernel closes the connection, bounded: the client's monitor says DISCONNECTED,
    or the tcp connection ``pair`` is gone from the host at both ends.  A libzmq that has stopped
    reading (its receive pipe full) no longer looks at its socket, so it may notice no close at
    all; the kernel's reset removes the connection from both ends' tables all the same (a FIN
    would wait behind the unread bytes, the kernel's end in FIN-WAIT-1, the client's ESTABLISHED)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if mon.poll(200) and recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
            return
        if not tcp_alive(pair):
            return
    raise AssertionError(f"the kernel did not drop the connection within {WAIT_S:g} s")


def budgets(c: Client) -> dict:
    return c.stats()["peer_budgets"]


def rss_back(proc: psutil.Process, before: int) -> int:
    """The kernel's RSS once it is within 10% of ``before`` (+ 8 MB of slack), or the last one
    seen after a bounded wait."""
    deadline = time.monotonic() + 20.0
    while True:
        rss = proc.memory_info().rss
        if rss <= before * 1.10 + 8e6 or time.monotonic() > deadline:
            return rss
        time.sleep(0.2)


def test_a_client_that_never_reads_its_replies_is_dropped_and_the_memory_comes_back():
    with KernelProcess.from_config(config("tcp")) as k:
        proc = psutil.Process(k.pid)
        ctx = zmq.Context()
        try:
            honest = Client(k.endpoint, timeout=WAIT_S, retries=0, context=ctx)
            honest.wait_for_service("echo", WAIT_S)
            # An honest reader of large replies: 36 MiB through an 8 MiB budget, never dropped
            # (what left the process is credited from TCP's count).
            reader = ctx.socket(zmq.DEALER)
            reader.setsockopt(zmq.LINGER, 0)
            reader.connect(k.endpoint)
            for _ in range(3):
                reader.send_multipart(BIG)
                assert reader.poll(WAIT_S * 1000), "no reply to a large echo"
                assert reader.recv_multipart()[3:] == [FRAME] * 3
            before = proc.memory_info().rss
            bad, mon = never_reader(ctx, k.endpoint)
            pair = tcp_pair(k.endpoint, mon)
            # Three 12 MiB requests at once, then nothing: 36 MiB of replies against the 8 MiB
            # budget, and no later send of the client's that could provoke a reset by itself.
            for _ in range(3):
                bad.send_multipart(BIG)
            wait_dropped(mon, pair)
            bad.close(0)
            assert honest.call("echo", {"after": 1}) == {"after": 1}  # others are served
            reader.send_multipart(BIG)
            assert reader.poll(WAIT_S * 1000) and reader.recv_multipart()[3:] == [FRAME] * 3
            b = budgets(honest)
            assert b["dropped_out"] >= 1 and b["dropped_in"] == 0
            after = rss_back(proc, before)
            assert after <= before * 1.10 + 8e6, f"kernel RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB"
            honest.close()
        finally:
            ctx.destroy(linger=0)
        assert any("dropped: it did not read" in line for line in k.lines), k.lines[-10:]


def wait_for(what: str, check: Callable[[], bool], each: Callable[[], None] | None = None) -> None:
    """Until ``check()``, bounded; ``each()`` between looks (an attack going on until then)."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S:g} s: {what}"
        if each is not None:
            each()
        time.sleep(0.1)


def test_a_slow_reader_of_a_stream_is_dropped_and_its_request_cancelled_while_a_reader_keeps_up():
    with KernelProcess.from_config(config("ipc")) as k:
        ctx = zmq.Context()
        try:
            honest = Client(k.endpoint, timeout=WAIT_S, retries=0, context=ctx)
            honest.wait_for_service("echo", WAIT_S)
            peers = honest.stats()["connections"]["peers"]
            bad, _ = never_reader(ctx, k.endpoint)
            header = build_header(1, job=None, budget=None, priority=None, deadline_ms=None, idem=None, txn=None)
            bad.send_multipart(request_frames("echo", header, {"partials": 2000, "pad": MIB}))
            # A peer whose libzmq reads nothing may not notice the close over ipc; the kernel's
            # side is what is bounded: the drop counted and the connection gone from its count.
            wait_for("the slow reader dropped", lambda: budgets(honest)["dropped_out"] == 1)
            wait_for("its connection closed", lambda: honest.stats()["connections"]["peers"] == peers)
            # Its stream was cancelled: the worker stops at its next safe point and is free again.
            wait_for("the stream ended", lambda: honest.stats()["services"]["echo"]["inflight"] == 0)
            bad.close(0)
            # A reader that keeps up streams more than the budget and is not dropped.
            # (paused and resumed on the way, perhaps: those notes are partials too)
            got = [r for r in honest.stream("echo", {"partials": 12, "pad": MIB}) if not r.final]
            data = [r for r in got if isinstance(r.payload, dict) and "pad" in r.payload]
            assert len(data) == 12 and all(len(r.payload["pad"]) == MIB for r in data)
            b = budgets(honest)
            assert b["dropped_out"] == 1 and b["dropped_in"] == 0, b
        finally:
            ctx.destroy(linger=0)
        assert any("dropped: it did not read" in line for line in k.lines), k.lines[-10:]


def test_a_flood_of_requests_past_the_inbound_budget_is_dropped_at_once():
    extra = {"peer_in_bytes": 4 * MIB}
    cfg = (
        kernel_config(service_block("echo", "services.echo"), heartbeat=0.5, unavailable_wait=5.0, kernel_extra=extra)
        + LIMITS
    )
    with KernelProcess.from_config(cfg) as k:
        ctx = zmq.Context()
        try:
            honest = Client(k.endpoint, timeout=WAIT_S, retries=0, context=ctx)
            honest.wait_for_service("echo", WAIT_S)
            # The only echo slot is kept busy, so the flood waits in the kernel's queue.
            busy = ctx.socket(zmq.DEALER)
            busy.setsockopt(zmq.LINGER, 0)
            busy.connect(k.endpoint)
            header = build_header(1, job=None, budget=None, priority=None, deadline_ms=None, idem=None, txn=None)
            busy.send_multipart(request_frames("echo", header, {"steps": 400, "step_ms": 10}))
            # A flooder that reads: it gets the typed answer before its connection is closed.
            flood = ctx.socket(zmq.DEALER)
            flood.setsockopt(zmq.LINGER, 0)
            flood.connect(k.endpoint)
            body = [P.MDPC, P.ClientCmd.REQUEST.value, b"echo", b"f" * MIB]

            def attack() -> None:
                try:
                    flood.send_multipart(body, zmq.NOBLOCK)
                except zmq.Again:
                    pass

            wait_for("the flood dropped", lambda: budgets(honest)["dropped_in"] >= 1, attack)
            quotas_seen = set()
            while flood.poll(2000):  # its answers, until the kernel closed the connection
                status = codec.unpack(flood.recv_multipart()[3])
                quotas_seen.add(status["error"].get("quota"))
            assert "peer_in_bytes" in quotas_seen, quotas_seen
            flood.close(0)
            assert honest.stats()["summary"]["queued_bytes"] <= 4 * MIB
            assert busy.poll(WAIT_S * 1000), "the request that held the slot was not answered"
            assert honest.call("echo", {"after": 1}) == {"after": 1}
        finally:
            ctx.destroy(linger=0)
        assert any("dropped: it held" in line for line in k.lines), k.lines[-10:]


def test_connections_each_under_their_budget_are_bounded_together():
    """Three never-readers, each under its own budget (16 MiB, a grace longer than the test), hold
    more than every connection together may (12 MiB): the one holding the most is dropped.  Each
    asks for two 12 MiB replies: its libzmq takes the first whole (RCVHWM 1: those bytes have left
    the kernel's process, and how soon it has drained them is a race with the kernel's samples),
    the OS buffers a few MiB of the second, and the rest of the second stays in the kernel: about
    8 MiB each, 24 MiB together."""
    extra = {
        "peer_out_bytes": 16 * MIB,
        "peer_out_grace_s": 600.0,
        "peers_out_bytes": 12 * MIB,
        "peer_in_bytes": 64 * MIB,  # 2 x 12 MiB requests per peer: not this test's subject
        "control": "tcp://127.0.0.1:0",
    }
    cfg = (
        kernel_config(
            service_block("echo", "services.echo"),
            endpoint="tcp://127.0.0.1:0",
            heartbeat=0.5,
            unavailable_wait=5.0,
            kernel_extra=extra,
        )
        + LIMITS
        + "\n[auth]\ninsecure = true\n"
    )
    with KernelProcess.from_config(cfg) as k:
        ctx = zmq.Context()
        try:
            honest = Client(k.endpoint, timeout=WAIT_S, retries=0, context=ctx)
            honest.wait_for_service("echo", WAIT_S)
            bad = [never_reader(ctx, k.endpoint)[0] for _ in range(3)]
            for s in bad:
                s.send_multipart(BIG)  # two 12 MiB replies each: 72 MiB together
                s.send_multipart(BIG)
            wait_for("one of them dropped", lambda: budgets(honest)["dropped_total"] >= 1)
            wait_for("the rest within the total", lambda: budgets(honest)["outstanding"] <= 12 * MIB)
            b = budgets(honest)
            assert b["dropped_out"] == 0, b  # none was past its own budget
            assert honest.call("echo", {"after": 1}) == {"after": 1}
        finally:
            ctx.destroy(linger=0)
        assert any("which together passed" in line for line in k.lines), k.lines[-10:]


def test_a_slow_reader_of_a_stream_is_paused_and_resumed_and_gets_all_of_it():
    """Flow control before any drop: a reader of a stream that reads slower than the stream is
    produced (its libzmq holds two messages, its OS 4 KiB) has the stream paused whenever it is a
    quarter of its budget behind, resumed at an eighth, and reads every partial, undropped."""
    extra = {"peer_out_bytes": 4 * MIB, "peer_out_grace_s": 600.0, "control": "tcp://127.0.0.1:0"}
    cfg = (
        kernel_config(
            service_block("echo", "services.echo"),
            endpoint="tcp://127.0.0.1:0",
            heartbeat=0.5,
            unavailable_wait=5.0,
            kernel_extra=extra,
        )
        + LIMITS
        + "\n[auth]\ninsecure = true\n"
    )
    with KernelProcess.from_config(cfg) as k:
        ctx = zmq.Context()
        try:
            honest = Client(k.endpoint, timeout=WAIT_S, retries=0, context=ctx)
            honest.wait_for_service("echo", WAIT_S)
            slow = ctx.socket(zmq.DEALER)
            slow.setsockopt(zmq.LINGER, 0)
            slow.setsockopt(zmq.RCVHWM, 2)
            slow.setsockopt(zmq.RCVBUF, 4096)
            slow.connect(k.endpoint)
            header = build_header(1, job=None, budget=None, priority=None, deadline_ms=None, idem=None, txn=None)
            n, pad = 48, 128 * 1024
            slow.send_multipart(request_frames("echo", header, {"partials": n, "pad": pad, "partial_ms": 5}))
            got, final, notes = 0, None, []
            while final is None:
                assert slow.poll(WAIT_S * 1000), f"the stream stalled after {got} partials"
                _, reply = parse_reply(slow.recv_multipart())
                if reply.final:
                    final = reply
                elif isinstance(reply.payload, dict) and "pad" in reply.payload:  # not a paused/resumed note
                    assert len(reply.payload["pad"]) == pad
                    got += 1
                else:
                    notes.append(reply.status)
                time.sleep(0.05)  # slower than the stream
            assert got == n and final.status == P.STATUS_OK, (got, final)
            b = budgets(honest)
            assert b["pauses"] >= 1 and b["dropped_out"] == 0, b
            assert P.STATUS_PAUSED in notes, notes  # the worker said so, at a safe point
        finally:
            ctx.destroy(linger=0)
