"""Unit tests: what the router keeps is bounded by what is live (no sockets, time passed in)."""

from __future__ import annotations

from kernel import codec
from kernel import protocol as P
from kernel.router import Router
from tests.test_kernel_router import Wire, ready, reca, request

W = P.WorkerCmd


def final(r: Router, worker: bytes, msg: list[bytes], now: float) -> None:
    status = codec.pack({"v": 1, "id": 0, "status": "ok", "spent": {}})
    r.on_message([worker, P.MDPW, W.FINAL.value, msg[3], b"", status, codec.pack("r")], now)


def code(msg: list[bytes]) -> str:
    return codec.unpack(msg[4])["error"]["code"]


def test_services_without_workers_expire_and_are_capped():
    wire = Wire()
    r = Router(wire, unavailable_wait=1.0, service_expiry=5.0, max_workerless=100)
    ready(r, b"W1")
    for n in range(150):
        request(r, b"C1", service=f"name{n}".encode(), body=[reca(n), codec.pack(None)], now=0.0)
    answered = [code(m) for m in wire.to(b"C1")]
    assert answered == ["unavailable"] * 50  # past the cap: at once, and no state kept
    assert len(r.services) == 101
    r.tick(1.5)  # the other 100 wait out unavailable_wait
    assert [code(m) for m in wire.to(b"C1")] == ["unavailable"] * 100
    # No worker ever served these names: they are forgotten as soon as they are answered (a
    # service that had workers expires after service_expiry instead: the next test).
    assert set(r.services) == {b"echo"}
    # The cap is free again.
    request(r, b"C2", service=b"again", body=[reca(1), codec.pack(None)], now=7.0)
    assert not wire.to(b"C2") and b"again" in r.services


def test_a_service_that_loses_its_last_worker_expires_once_idle():
    wire = Wire()
    r = Router(wire, service_expiry=5.0)
    ready(r, b"W1", service=b"gone")
    r.on_message([b"W1", P.MDPW, W.DISCONNECT.value], 1.0)
    r.tick(3.0)
    assert b"gone" in r.services
    r.tick(6.5)
    assert b"gone" not in r.services


def test_queue_entries_leave_at_their_deadline_and_free_the_queue():
    wire = Wire()
    r = Router(wire, max_queue=2)
    ready(r, b"W1")
    request(r, b"C0", body=[reca(0), codec.pack(0)])  # occupies the only slot
    (busy,) = wire.to(b"W1")
    request(r, b"C1", body=[reca(1, deadline=100), codec.pack(1)], now=0.0)
    request(r, b"C2", body=[reca(2, deadline=100), codec.pack(2)], now=0.0)
    request(r, b"C3", body=[reca(3), codec.pack(3)], now=0.0)
    assert code(wire.to(b"C3")[0]) == "overloaded"  # really full
    r.tick(0.2)
    assert code(wire.to(b"C1")[0]) == "deadline" and code(wire.to(b"C2")[0]) == "deadline"
    assert r.service_stats()[0].queued == 0
    request(r, b"C4", body=[reca(4), codec.pack(4)], now=0.3)
    assert wire.to(b"C4") == []  # queued, not overloaded
    final(r, b"W1", busy, 0.4)
    (sent,) = [m for m in wire.to(b"W1") if m[2] == W.REQUEST.value]
    assert codec.unpack(sent[-1]) == 4  # C4 dispatched


def test_finished_requests_are_freed_behind_an_earlier_deadline():
    wire = Wire()
    r = Router(wire)
    ready(r, b"W1", capacity=2)
    request(r, b"C0", body=[reca(0, deadline=10_000), codec.pack(0)])  # in flight all along
    wire.to(b"W1")
    answered = 0
    for n in range(10_000):
        request(r, b"C1", body=[reca(n, deadline=60_000), b"x" * 100], now=1.0)
        (msg,) = wire.to(b"W1")
        final(r, b"W1", msg, 1.0)
        # Collected as they come: left in the wire, 10,000 replies made every ``wire.to`` scan them
        # (quadratic: 10 s at load 5, past the 120 s bound at load 40).
        answered += len(wire.to(b"C1"))
    assert answered == 10_000
    assert len(r.inflight) == 1
    assert len(r._deadlines) <= 2 * 1 + 64  # the finished ones left the heap
    assert r._deadlines_live == 1


def test_queue_heap_stays_proportional_to_live_entries():
    wire = Wire()
    r = Router(wire)
    ready(r, b"W1")
    request(r, b"C0", body=[reca(0), codec.pack(0)])
    for n in range(5_000):
        request(r, b"C1", body=[reca(n, deadline=50), codec.pack(n)], now=float(n))
        r.tick(float(n) + 0.1)  # each queued request times out in the queue
    service = r.services[b"echo"]
    assert service.queued == 0 and len(service.queue) <= 64


def test_stats_are_paged_and_one_service_can_be_asked_for():
    r = Router(Wire(), unavailable_wait=100.0)
    for n in range(250):
        request(r, b"C", service=f"s{n:03d}".encode(), body=[reca(n), codec.pack(None)])
    first = r.stats()
    assert len(first["services"]) == P.STATS_PAGE and first["summary"]["services"] == 250
    assert first["summary"]["pages"] == 3
    last = r.stats(query={"page": 2})
    assert list(last["services"]) == [f"s{n:03d}" for n in range(200, 250)]
    assert list(r.stats(query={"service": "s123"})["services"]) == ["s123"]


def test_a_flooding_client_delays_another_by_one_request_per_round():
    wire = Wire()
    r = Router(wire)
    ready(r, b"W1")
    request(r, b"FLOOD", body=[reca(0), codec.pack(0)])  # occupies the only slot
    (busy,) = wire.to(b"W1")
    for n in range(1, 500):
        request(r, b"FLOOD", body=[reca(n), codec.pack(n)])
    request(r, b"HONEST", body=[reca("h"), codec.pack("h")])
    served = []
    msg = busy
    for _ in range(3):
        final(r, b"W1", msg, 1.0)
        (msg,) = [m for m in wire.to(b"W1") if m[2] == W.REQUEST.value]
        served.append(codec.unpack(msg[-1]))
    assert served[:2] == [1, "h"]  # after one flood request (its round 0), not after 499


def test_a_full_queue_evicts_the_largest_holder_not_a_newcomer():
    wire = Wire()
    r = Router(wire, max_queued_bytes=10_000)
    ready(r, b"W1")
    request(r, b"FLOOD", body=[reca(0), codec.pack(0)])  # occupies the only slot
    wire.to(b"W1")
    for n in range(1, 20):
        request(r, b"FLOOD", body=[reca(n), b"x" * 900])
    refused = [codec.unpack(m[4])["id"] for m in wire.to(b"FLOOD")]
    assert refused and r.queued_bytes <= 10_000  # the flood alone fills the queues
    request(r, b"HONEST", body=[reca("h"), b"y" * 900])
    assert wire.to(b"HONEST") == []  # queued: the flood's newest request made room
    (evicted,) = wire.to(b"FLOOD")
    newest_queued = max(set(range(1, 20)) - set(refused))
    assert code(evicted) == "overloaded" and codec.unpack(evicted[4])["id"] == newest_queued
    assert r.queued_bytes <= 10_000 and r.counters["queue_evictions"] == 1
