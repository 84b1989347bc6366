"""Unit tests of the routing state machine: no sockets, time passed in."""

from __future__ import annotations

import pytest

from kernel import codec
from kernel import protocol as P
from kernel.router import Router

C = P.ClientCmd
W = P.WorkerCmd


class Wire:
    """Collects what the router sends; peers in ``gone`` are unroutable."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.gone: set[bytes] = set()

    def __call__(self, frames):
        if frames[0] in self.gone:
            return False
        self.sent.append(frames)
        return True

    def to(self, ident: bytes) -> list[list[bytes]]:
        out = [f for f in self.sent if f[0] == ident]
        self.sent = [f for f in self.sent if f[0] != ident]
        return out


def ready(r: Router, w: bytes, service=b"echo", now=0.0, capacity=None):
    frames = [w, P.MDPW, W.READY.value, service]
    if capacity:
        frames.append(codec.pack({"capacity": capacity}))
    r.on_message(frames, now)


def request(r: Router, client: bytes, service=b"echo", body=(b"hi",), now=0.0):
    r.on_message([client, P.MDPC, C.REQUEST.value, service, *body], now)


def reca(rid, **header):
    return codec.pack({"v": 1, "id": rid, **header})


@pytest.fixture
def wire():
    return Wire()


@pytest.fixture
def router(wire):
    return Router(wire, heartbeat_interval=1.0, liveness=3, unavailable_wait=2.0)


def test_request_reaches_worker_and_reply_reaches_client(router, wire):
    ready(router, b"W1")
    request(router, b"C1", body=[b"hello", b"world"])
    (msg,) = wire.to(b"W1")
    assert msg[1:3] == [P.MDPW, W.REQUEST.value]
    token = msg[3]
    assert msg[4] == b"" and msg[5:] == [b"hello", b"world"]
    router.on_message([b"W1", P.MDPW, W.FINAL.value, token, b"", b"reply"], 0.1)
    (out,) = wire.to(b"C1")
    assert out == [b"C1", P.MDPC, C.FINAL.value, b"echo", b"reply"]


def test_majortomo_client_form_is_answered_in_its_own_form(router, wire):
    ready(router, b"W1")
    router.on_message([b"C1", b"", P.MDPC, P.MajortomoClientCmd.REQUEST.value, b"echo", b"x"], 0.0)
    (msg,) = wire.to(b"W1")
    router.on_message([b"W1", P.MDPW, W.PARTIAL.value, msg[3], b"", b"p"], 0.0)
    router.on_message([b"W1", P.MDPW, W.FINAL.value, msg[3], b"", b"f"], 0.0)
    assert wire.to(b"C1") == [
        [b"C1", b"", P.MDPC, P.MajortomoClientCmd.PARTIAL.value, b"p"],
        [b"C1", b"", P.MDPC, P.MajortomoClientCmd.FINAL.value, b"f"],
    ]


def test_majortomo_worker_form(router, wire):
    router.on_message([b"W1", b"", P.MDPW, W.READY.value, b"echo"], 0.0)
    request(router, b"C1")
    (msg,) = wire.to(b"W1")
    assert msg[:4] == [b"W1", b"", P.MDPW, W.REQUEST.value]
    router.on_message([b"W1", b"", P.MDPW, W.FINAL.value, msg[4], b"", b"ok"], 0.0)
    assert wire.to(b"C1")[0][-1] == b"ok"


def test_lru_dispatch(router, wire):
    for w in (b"W1", b"W2", b"W3"):
        ready(router, w)
    order = []
    for i in range(3):
        request(router, b"C%d" % i)
        order += [m[0] for m in wire.sent if m[1] == P.MDPW and m[2] == W.REQUEST.value]
        wire.sent.clear()
    assert order == [b"W1", b"W2", b"W3"]


def test_queue_waits_for_a_busy_worker_then_dispatches_by_priority(router, wire):
    ready(router, b"W1")
    request(router, b"C0", body=[reca(0, priority=0), codec.pack(0)])
    (busy,) = wire.to(b"W1")
    request(router, b"C1", body=[reca(1, priority=1), codec.pack(1)], now=0.1)
    request(router, b"C2", body=[reca(2, priority=5), codec.pack(2)], now=0.2)
    assert wire.to(b"W1") == []
    status = codec.pack({"v": 1, "id": 0, "status": "ok", "spent": {}})
    router.on_message([b"W1", P.MDPW, W.FINAL.value, busy[3], b"", status, codec.pack("r")], 0.3)
    (nxt,) = wire.to(b"W1")
    assert codec.unpack(nxt[6]) == 2  # the higher priority went first


def test_dead_worker_fails_inflight_with_worker_died_at_once(router, wire):
    ready(router, b"W1")
    request(router, b"C1", body=[reca("a"), codec.pack(1)])
    wire.sent.clear()
    router.on_message([b"W1", P.MDPW, W.DISCONNECT.value], 0.5)
    (out,) = wire.to(b"C1")
    status = codec.unpack(out[4])
    assert status["status"] == "error" and status["error"]["code"] == "worker_died" and status["id"] == "a"


def test_liveness_window(router, wire):
    ready(router, b"W1", now=0.0)
    request(router, b"C1", body=[reca(7), codec.pack(1)], now=0.1)
    router.tick(2.9)  # inside 3 x 1 s
    assert not wire.to(b"C1")
    router.tick(3.3)  # the sweep runs every quarter interval
    (out,) = wire.to(b"C1")
    assert codec.unpack(out[4])["error"]["code"] == "worker_died"
    assert b"W1" not in router.workers


def test_heartbeat_keeps_worker_alive_and_kernel_heartbeats(router, wire):
    ready(router, b"W1", now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        router.on_message([b"W1", P.MDPW, W.HEARTBEAT.value], t)
        router.tick(t + 0.5)
    assert b"W1" in router.workers
    beats = [m for m in wire.to(b"W1") if m[2] == W.HEARTBEAT.value]
    assert len(beats) >= 4


def test_unknown_service_is_unavailable_after_bounded_wait(router, wire):
    request(router, b"C1", service=b"nosuch", body=[reca(1), codec.pack(None)], now=0.0)
    router.tick(1.9)
    assert not wire.to(b"C1")
    router.tick(2.3)
    (out,) = wire.to(b"C1")
    assert codec.unpack(out[4])["error"]["code"] == "unavailable"


def test_worker_arriving_in_time_serves_the_waiting_request(router, wire):
    request(router, b"C1", service=b"late", now=0.0)
    ready(router, b"W9", service=b"late", now=1.0)
    assert len(wire.to(b"W9")) == 1
    router.tick(2.5)
    assert not [m for m in wire.to(b"C1") if m[2] == C.FINAL.value]


def test_exactly_one_final_and_late_replies_are_counted(router, wire):
    ready(router, b"W1")
    request(router, b"C1", body=[reca(1, deadline=100), codec.pack(1)], now=0.0)
    (msg,) = wire.to(b"W1")
    router.tick(0.2)  # deadline passed: the kernel answers
    (out,) = wire.to(b"C1")
    assert codec.unpack(out[4])["error"]["code"] == "deadline"
    status = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
    router.on_message([b"W1", P.MDPW, W.FINAL.value, msg[3], b"", status, b""], 0.3)
    assert wire.to(b"C1") == []
    assert router.counters["late_replies"] == 1
    # and the worker's slot is free again
    request(router, b"C2", now=0.4)
    assert len([m for m in wire.to(b"W1") if m[2] == W.REQUEST.value]) == 1


def test_capacity_allows_several_requests_per_worker(router, wire):
    ready(router, b"W1", capacity=3)
    for i in range(4):
        request(router, b"C%d" % i)
    assert len(wire.to(b"W1")) == 3


@pytest.mark.parametrize("frames", [
    [b"X"],
    [b"X", b"garbage"],
    [b"X", P.MDPC],
    [b"X", P.MDPC, b"\x09", b"echo"],
    [b"X", P.MDPC, C.REQUEST.value],
    [b"X", P.MDPC, C.REQUEST.value, b""],
    [b"X", b"", b""],
    [b"X", P.MDPW],
    [b"X", P.MDPW, b"\x07"],
    [b"X", P.MDPW, W.FINAL.value, b"tok", b"", b"x"],
    [b"X", P.MDPW, W.READY.value],
    [b"X", P.MDPW, W.READY.value, b"mmi.evil"],
    [b"X", P.MDPW, W.READY.value, b"s", b"\xc1"],
    [b"X"] + [b"f"] * 100,
])
def test_malformed_messages_never_raise_and_are_counted(router, wire, frames):
    router.on_message(frames, 0.0)
    assert router.counters["bad_messages"] + router.counters["protocol_errors"] >= 1 or frames == [b"X"]
    ready(router, b"W1")
    request(router, b"C1")
    assert len(wire.to(b"W1")) == 1


def test_bad_reca_header_gets_bad_request(router, wire):
    ready(router, b"W1")
    for hdr in ({"v": 2, "id": 1}, {"v": 1, "id": [1]}, {"v": 1, "priority": "hi"},
                {"v": 1, "budget": {"tokens": -1}}, {"v": 1, "deadline": 0}, {"v": 1, "job": 5}):
        request(router, b"C1", body=[codec.pack(hdr), codec.pack(None)])
        (out,) = wire.to(b"C1")
        status = codec.unpack(out[4])
        assert status["error"]["code"] == "bad_request", hdr
        # the id is echoed where it is a valid one (str or int), never a malformed one (a list here)
        assert status.get("id") == (hdr.get("id") if hdr.get("id") != [1] else None), hdr
    assert wire.to(b"W1") == []


def test_ready_twice_is_a_protocol_error(router, wire):
    ready(router, b"W1")
    ready(router, b"W1")
    assert b"W1" not in router.workers
    assert any(m[2] == W.DISCONNECT.value for m in wire.to(b"W1"))


def test_mmi_service_and_stats(router, wire):
    ready(router, b"W1")
    request(router, b"C1", service=b"mmi.service", body=[b"echo"])
    request(router, b"C1", service=b"mmi.service", body=[b"nope"])
    request(router, b"C1", service=b"mmi.nonesuch", body=[])
    outs = wire.to(b"C1")
    assert [o[-1] for o in outs] == [b"200", b"404", b"501"]
    request(router, b"C2", service=b"mmi.stats", body=[reca(1), codec.pack(None)])
    (out,) = wire.to(b"C2")
    stats = codec.unpack(out[5])
    assert stats["services"]["echo"]["workers"] == 1


def test_unroutable_worker_is_dropped_and_request_requeued_error(router, wire):
    ready(router, b"W1")
    wire.gone.add(b"W1")
    request(router, b"C1", body=[reca(1), codec.pack(1)])
    (out,) = wire.to(b"C1")
    assert codec.unpack(out[4])["error"]["code"] == "worker_died"
