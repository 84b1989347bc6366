"""An operator's priority crosses principals (issue 23: "priority orders requests within one
principal (an operator's may cross)"; kernel/fairq.py, the express heap): the pure queue, then
through a Router with principals and a fake clock."""

from __future__ import annotations

from kernel import codec
from kernel import protocol as P
from kernel.auth import Principal
from kernel.fairq import FairQueue
from tests.test_fairq import LIMITS, Req, drain, kern, send  # noqa: F401 - kern is a fixture

OPS = Principal("ops", "operator")
ALICE = Principal("alice", "client")
BOB = Principal("bob", "client")
SVC = Principal("svc", "service:echo")
W = P.WorkerCmd


def test_a_crossing_request_goes_before_every_principals_round_by_priority():
    q = FairQueue()
    for i in range(4):
        q.push("alice", 1000, i, Req("alice", i, 1000))
    q.push("bob", 0, 0, Req("bob", 0))
    q.push("ops", 5, 0, Req("ops", 0, 5), crosses=True)
    q.push("ops", 7, 1, Req("ops", 1, 7), crosses=True)
    q.check()
    assert len(q) == 7
    assert q.top_priority() == 1000 and q.top_priority("bob") == 7  # an operator's counts for everyone
    out = drain(q)
    assert [(r.who, r.n) for r in out[:2]] == [("ops", 1), ("ops", 0)]  # first, by priority
    assert [r.who for r in out[2:4]] == ["alice", "bob"]  # then DRR as before
    assert len(q) == 0 and not q.express


def test_done_crossing_requests_are_dropped_and_compacted():
    q = FairQueue()
    gone = [Req("ops", i, 5, done=True) for i in range(100)]
    for r in gone:
        q.push("ops", 5, r.n, r, crosses=True)
    live = Req("alice", 0)
    q.push("alice", 0, 0, live)
    assert q.top_priority() == 0  # done express entries do not count
    q.compact(live=1, slack=0)
    q.check()
    assert len(q) == 1 and q.pop() is live


def _serve(router, wire, n, now):
    served = []
    for _ in range(n):
        (msg,) = wire.to(b"W")
        token = msg[3]
        req = next(r for r in router.inflight.values() if r.token == token)
        served.append((req.principal.name, req.priority))
        ok = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
        router.on_message([b"W", P.MDPW, W.FINAL.value, token, b"", ok, codec.pack(0)], now, SVC)
        router.check_invariants()
        now += 0.1
    return served


def test_an_operators_priority_crosses_another_principals_backlog(kern):
    router, wire = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    for rid in range(1, 11):  # alice's backlog at priority 1000: one runs, 9 wait
        send(router, ALICE, b"A", rid, 1000, 0.01 * rid)
    send(router, BOB, b"B", 1, 5, 0.3)  # a client's priority 5: its DRR turn only
    send(router, OPS, b"O", 1, 5, 0.4)  # an operator's priority 5: ahead of every round
    send(router, OPS, b"O", 2, 0, 0.5)  # an operator at the default priority: shares like anyone
    served = _serve(router, wire, 13, 1.0)
    assert served[1] == ("ops", 5), served  # right after the request in flight
    assert served.index(("bob", 5)) < served.index(("ops", 0)) < len(served) - 1, served
    assert served.count(("alice", 1000)) == 10


def test_a_clients_priority_still_does_not_cross(kern):
    router, wire = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    for rid in range(1, 6):
        send(router, ALICE, b"A", rid, 0, 0.01 * rid)
    for rid in range(1, 4):
        send(router, BOB, b"B", rid, 1000, 0.3)
    served = [who for who, _ in _serve(router, wire, 8, 1.0)]
    # DRR: bob's priority 1000 orders his own requests only -- he and alice alternate
    assert served[1:7] in (["bob", "alice"] * 3, ["alice", "bob"] * 3), served
