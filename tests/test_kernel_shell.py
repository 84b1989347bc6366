"""The kernel's I/O shell in process, without its event loop (kernel.server, kernel.aio): a real
ROUTER on an ipc endpoint, driven by hand.  What the hot path's hand-written steps must keep:
``send_frames`` is ``send_multipart``; ``_recv`` reads a new peer's metadata from its first frame and
keeps both bounds on every frame; ``_send`` counts a client message as ``PeerBudgets.sent`` does
(and nothing for a worker's); ``_arm`` leaves the timer at or before ``next_wakeup()``; the decision
log's group commit (``DecisionLog.flush``, once a turn) writes every record whole.  The system
tests (tests/test_kernel_bounds.py, tests/test_kernel_peer_drop.py) cover the same paths end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import zmq

from kernel import codec
from kernel import protocol as P
from kernel.aio import recv_frames, send_frames
from kernel.server import KernelServer, Oversized

REQ = [P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack({"v": 1, "id": 1}), codec.pack({"x": 1})]


class _Sub(zmq.Socket):  # type(sock) is not zmq.Socket: send_frames takes pyzmq's own send
    pass


@pytest.mark.parametrize("raw", [True, False])
def test_send_frames_is_send_multipart(raw: bool) -> None:
    ctx = zmq.Context()
    a = ctx.socket(zmq.PAIR) if raw else ctx.socket(zmq.PAIR, socket_class=_Sub)
    b = ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://send-frames")
        b.connect("inproc://send-frames")
        big = bytes(range(256)) * 300  # past the copy bound: sent without a copy
        for frames in ([b"one"], [b"a", b"", big, b"z"], [big], [b"x", bytearray(b"y")]):
            send_frames(a, list(frames))
            assert b.poll(2000)
            assert recv_frames(b) == [bytes(f) for f in frames]
        send_frames(a, [])  # nothing
        send_frames(a, [b"after"], nonblocking=False)
        assert b.poll(2000) and recv_frames(b) == [b"after"]
        assert not b.poll(50)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


@pytest.fixture
def shell(tmp_path) -> Iterator[tuple[KernelServer, zmq.Socket]]:
    server = KernelServer(f"ipc://{tmp_path}/k.sock", f"ipc://{tmp_path}/c.sock", max_message=4096)
    server._loop = loop = asyncio.new_event_loop()  # timers are armed on it, never run
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"ipc://{tmp_path}/k.sock")
    try:
        yield server, client
    finally:
        client.close(0)
        ctx.term()
        server.close()
        loop.close()


def _recv(server: KernelServer) -> list[bytes]:
    assert server.sock.poll(2000)
    frames, principal = server._recv()
    assert principal.name == "local"
    return frames


def test_recv_a_new_peer_then_the_steady_state_and_both_bounds(shell) -> None:
    server, client = shell
    client.send_multipart(REQ)
    first = _recv(server)  # a new peer: its connection is counted and accounted
    ident = first[0]
    assert first[1:] == REQ and ident in server.peers.accounts
    client.send_multipart(REQ)
    assert _recv(server) == first  # a known peer: the lean loop, the same frames
    # the frame bound, then the size bound, each past its limit on a later frame; the rest of the
    # message is discarded and the next one is whole
    over_frames = [P.MDPC] + [b"f"] * server.max_frames
    over_size = [P.MDPC, P.ClientCmd.REQUEST.value, b"x" * 3000, b"y" * 2000, b"tail"]
    for bad in (over_frames, over_size):
        before = server.router.counters["oversized_messages"]
        client.send_multipart(bad)
        client.send_multipart(REQ)
        assert server.sock.poll(2000)
        with pytest.raises(Oversized) as exc:
            server._recv()
        assert exc.value.identity == ident
        assert server.router.counters["oversized_messages"] == before + 1
        assert _recv(server) == first


def test_recv_a_new_peer_past_the_bound_on_its_first_frame(shell) -> None:
    server, client = shell
    client.send_multipart([b"x" * 5000, b"more"])
    assert server.sock.poll(2000)
    with pytest.raises(Oversized):
        server._recv()
    assert len(server.peers.accounts) == 1  # accounted all the same
    client.send_multipart(REQ)
    assert _recv(server)[1:] == REQ


def test_send_counts_a_client_message_as_peer_budgets_sent(shell) -> None:
    server, client = shell
    client.send_multipart(REQ)
    ident = _recv(server)[0]
    peers, acct = server.peers, server.peers.accounts[ident]
    to_worker = [ident, P.MDPW, P.WorkerCmd.REQUEST.value, b"t" * 16, b"", b"h", b"body"]
    assert server._send(to_worker) is True
    assert acct.sent == 0 and peers.total == 0  # a worker's message: not a client budget's
    reply = [ident, P.MDPC, b"\x03", b"echo", b"status", b"x" * 100]
    size = sum(map(len, reply)) - len(ident)
    assert server._send(reply) is True
    assert acct.sent == size and peers.total == size
    assert ident not in peers.hot and ident not in server._urgent
    # what left the process is not held: below the pause after the next send, whatever was sent
    peers.total -= acct.outstanding
    acct.credited = acct.sent
    peers.pause_at = size + 1
    assert server._send(reply) is True and not server._urgent
    # each bound exactly reached by the next send (>=): marked after it, and only that one
    peers.pause_at = acct.outstanding + size
    assert server._send(reply) is True
    assert ident in server._urgent and ident not in peers.hot
    server._urgent.clear()
    peers.sample_at = acct.outstanding + size
    acct.paused = True  # a paused peer is not paused again
    assert server._send(reply) is True
    assert ident in peers.hot and not server._urgent
    peers.sample_at = 1 << 40  # (no sample before the next sends: it would credit)
    peers.total_bytes = peers.total + size  # every connection together: past it, not at it
    assert server._send(reply) is True and not server._urgent
    assert server._send(reply) is True and server._urgent == {b""}
    peers.check_invariants()
    n = 0
    while client.poll(500):
        client.recv_multipart()
        n += 1
    assert n == 7


def test_an_armed_timer_is_never_after_next_wakeup(shell) -> None:
    server, _ = shell
    r = server.router.next_wakeup()
    server._next_reconcile = r + 10
    server._arm()
    server.check_invariants()
    assert server._timer_at == server.next_wakeup() == r
    server.guard.refusing[1 << 20] = r - 5  # a refused connection to shut down sooner
    server._arm()
    server.check_invariants()
    assert server._timer_at == r - 5
    server._next_reconcile = r - 7
    server._arm()
    server.check_invariants()
    assert server._timer_at == r - 7
    del server.guard.refusing[1 << 20]
    server._next_reconcile = r + 10  # later wake-ups: the timer stays (it fires early, no harm)
    server._arm()
    server.check_invariants()
    assert server._timer_at == r - 7 < server.next_wakeup()
    server._timer = None  # fired: re-armed for the next one
    server._timer_at = float("inf")
    server._arm()
    server.check_invariants()
    assert server._timer_at == r


def test_the_group_commit_writes_every_record_whole_through_failures_and_short_writes(tmp_path, monkeypatch) -> None:
    """DecisionLog.flush, once per loop turn: one write in the common case; a failed write keeps
    everything pending, a short one resumes where it stopped; the file ends whole and in order."""
    import errno
    import os

    from kernel.decisions import DecisionLog
    from kernel.logstore import read_records

    path = str(tmp_path / "d.log")
    log = DecisionLog(path, fsync="never")
    real = os.write
    steps: list[object] = []

    def write(fd: int, data) -> int:  # what the test's steps say, then the real write
        step = steps.pop(0) if fd == log._fd and steps else None
        if step == "fail":
            raise OSError(errno.EIO, "I/O error")
        return real(fd, bytes(data[: step if isinstance(step, int) else len(data)]))

    monkeypatch.setattr(os, "write", write)
    seq = 0

    def decide(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            log.append("queue", float(seq), {"job": "default"}, {"ok": True})

    assert log.flush() is True  # the session record: one write
    decide(3)
    steps[:] = ["fail"]
    assert log.flush() is False and log.error is not None and log.pending_bytes > 0
    decide(2)
    steps[:] = [10, 7]  # short writes, then the rest in one
    assert log.flush() is True and log.error is None and log.pending_bytes == 0
    decide(1)
    steps[:] = [5, "fail"]  # short, then a failure: the rest waits for the next flush
    assert log.flush() is False and log.pending_bytes > 0
    decide(2)
    assert log.flush() is True and log.pending_bytes == 0
    decide(1)
    assert log.flush() is True  # one record, one write
    log.close()
    recs = read_records(path)
    assert [r["seq"] for r in recs] == list(range(seq + 1))
    assert [r["op"] for r in recs] == ["session"] + ["queue"] * seq
