"""The per-principal deficit-round-robin queue (kernel/fairq.py): the pure part, then through a
Router with principals and a fake clock -- one principal's priority-1000 backlog cannot starve
another's request, and priority still orders requests within a principal."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import codec
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.auth import Principal
from kernel.decisions import DecisionLog
from kernel.fairq import FairQueue
from kernel.mmi import Management
from kernel.router import Router
from tests.test_kernel_router import Wire


@dataclasses.dataclass(eq=False)
class Req:
    who: str
    n: int
    priority: int = 0
    done: bool = False


def drain(q: FairQueue) -> list[Req]:
    out = []
    while (r := q.pop()) is not None:
        out.append(r)
        q.check()
    return out


def test_priority_orders_only_within_a_principal():
    q = FairQueue()
    for i in range(5):
        q.push("flood", 1000, 0, Req("flood", i, 1000))
    q.push("honest", 0, 0, Req("honest", 0))
    order = [(r.who, r.n) for r in drain(q)]
    # the honest request waits one round of the flooder (its weight: 1 request), not its backlog
    assert order.index(("honest", 0)) <= 1
    assert [n for who, n in order if who == "flood"] == [0, 1, 2, 3, 4]


def test_weights_share_dispatches_in_proportion():
    q = FairQueue({"a": 3, "b": 1})
    for i in range(40):
        q.push("a", 0, i, Req("a", i))
        q.push("b", 0, i, Req("b", i))
    first = [r.who for r in drain(q)][:40]
    assert first.count("a") == 30 and first.count("b") == 10


def test_fractional_weights_carry_their_deficit():
    q = FairQueue({"a": 0.5, "b": 1})
    for i in range(20):
        q.push("a", 0, i, Req("a", i))
        q.push("b", 0, i, Req("b", i))
    first = [r.who for r in drain(q)][:15]
    assert first.count("a") == 5 and first.count("b") == 10


def test_done_requests_are_skipped_and_an_idle_principal_banks_no_credit():
    q = FairQueue()
    gone = Req("a", 0)
    q.push("a", 0, 0, gone)
    q.push("a", 0, 1, Req("a", 1))
    gone.done = True
    assert q.pop().n == 1
    assert q.pop() is None and not q.deficit and not q.active
    q.check()


def test_compact_drops_done_entries():
    q = FairQueue()
    reqs = [Req("a", i) for i in range(200)]
    for r in reqs:
        q.push("a", 0, r.n, r)
    for r in reqs[:150]:
        r.done = True
    q.compact(50, slack=10)
    assert len(q) == 50
    q.check()
    assert q.top_priority() == 0


def test_weights_must_be_positive():
    with pytest.raises(ValueError):
        FairQueue({"a": 0})
    with pytest.raises(ValueError):  # review: 1e-7 made one pop rotate 10^7 times (2.7 s of the kernel)
        FairQueue({"a": 1e-7})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(-5, 1000), st.booleans()), max_size=60),
    st.dictionaries(st.sampled_from("abcd"), st.sampled_from([0.5, 1, 2, 3]), max_size=4),
)
def test_drr_properties(items, weights):
    """Every live request comes out exactly once; within a principal by priority then order; no
    principal waits more than one round of the others' weights behind a waiting principal."""
    q = FairQueue(weights)
    reqs = []
    for n, (who, prio, done) in enumerate(items):
        r = Req(who, n, prio)
        q.push(who, prio, n, r)
        reqs.append(r)
    for r, (_, _, done) in zip(reqs, items):
        r.done = done
    q.check()
    out = drain(q)
    live = [r for r in reqs if not r.done]
    assert sorted(r.n for r in out) == sorted(r.n for r in live)
    for who in "abcd":
        mine = [(-r.priority, r.n) for r in out if r.who == who]
        assert mine == sorted(mine)
    # bounded wait: while a principal still had requests, between two of its dispatches each
    # other got at most its weight (+1: a fractional carry) per round the first needed
    for who in {r.who for r in out}:
        idx = [i for i, r in enumerate(out) if r.who == who]
        for a, b in zip([-1, *idx], idx):
            between = out[a + 1 : b]
            rounds = math.ceil(1 / min(q.weight(who), 1.0))  # rounds until it has the credit for one
            for other in {r.who for r in between}:
                cap = rounds * (int(q.weight(other)) + 1)
                assert sum(1 for r in between if r.who == other) <= cap, (who, other, [r.who for r in out])
    assert len(q) == 0 and not q.active


# -- through the router ---------------------------------------------------------------------------

ALICE = Principal("alice", "client")
BOB = Principal("bob", "client")
SVC = Principal("svc", "service:echo")
W = P.WorkerCmd
LIMITS = {"wall_ms": 1e6, "cpu_ms": 1e6, "tokens": 1e6, "flops": 1e9}


@pytest.fixture
def kern(tmp_path):
    log = DecisionLog(str(tmp_path / "d.jsonl"))
    adm = BudgetAdmission(
        decision_log=log,
        root_limits={k: v * 10 for k, v in LIMITS.items()},
        default_limits=LIMITS,
        max_pause=5.0,
        audit_quota=60,
    )
    wire = Wire()
    router = Router(wire, admission=adm, management=Management(adm), heartbeat_interval=100.0)
    yield router, wire
    log.close()


def send(router, who, client, rid, priority, now):
    header = {"v": 1, "id": rid, "priority": priority}
    router.on_message(
        [client, P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack(header), codec.pack(rid)], now, who
    )


def test_a_priority_1000_backlog_of_one_principal_does_not_starve_another(kern):
    router, wire = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    for rid in range(1, 21):  # alice's backlog: the first takes the slot, 19 wait
        send(router, ALICE, b"A", rid, 1000, 0.01 * rid)
    send(router, BOB, b"B", 1, 0, 0.5)  # bob's one request, at the default priority
    served = []
    now = 1.0
    for _ in range(21):
        msgs = wire.to(b"W")
        assert len(msgs) == 1
        token = msgs[0][3]
        req = next(r for r in router.inflight.values() if r.token == token)
        served.append(req.principal.name)
        ok = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
        router.on_message([b"W", P.MDPW, W.FINAL.value, token, b"", ok, codec.pack(0)], now, SVC)
        router.check_invariants()
        now += 0.1
    assert "bob" in served[:3], served  # one round of alice at most, not her 19 waiting requests
    assert served.count("alice") == 20


def test_queued_time_never_spends_wall_ms(kern):
    """bob's request waits 5 s behind alice's: its 1 s wall_ms budget runs from dispatch, and his
    job is charged wall time from dispatch only."""
    router, wire = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    send(router, ALICE, b"A", 1, 0, 0.0)
    (first,) = wire.to(b"W")
    header = {"v": 1, "id": 7, "budget": {"wall_ms": 1000}}
    router.on_message([b"B", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack(header), codec.pack(0)], 0.0, BOB)
    router.tick(3.0)  # 3 s queued, past its budget's length: not charged
    assert not wire.to(b"B") and router.inflight
    ok = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
    router.on_message([b"W", P.MDPW, W.FINAL.value, first[3], b"", ok, codec.pack(0)], 5.0, SVC)
    (second,) = [m for m in wire.to(b"W") if m[2] == W.REQUEST.value]  # bob's, dispatched at 5.0
    router.tick(5.9)
    assert not wire.to(b"B")  # 0.9 s since dispatch: still inside its 1 s
    router.check_invariants()
    router.tick(6.0)
    (answer,) = wire.to(b"B")
    assert codec.unpack(answer[4])["error"]["code"] == "budget_exceeded"
    job = router.admission.ledger.jobs["default:bob"]
    assert job.total.get("wall_ms", 0.0) == pytest.approx(1000.0, abs=1.0)  # from dispatch, not from 0.0


def test_a_newcomer_is_served_before_the_next_round_of_a_principal_that_was_alone():
    q = FairQueue()
    for i in range(5):
        q.push("flood", 1000, i, Req("flood", i, 1000))
    assert q.pop().who == "flood"  # alone: it spends its quantum
    q.push("honest", 0, 0, Req("honest", 0))
    assert q.pop().who == "honest"  # next, not after another round of the flood
    assert [r.who for r in drain(q)] == ["flood"] * 4


def test_another_principals_priority_does_not_keep_a_paused_request_from_its_slot(tmp_path):
    """Regression (review): alice's own high-priority request preempted her running one; when it
    ended, bob's queued priority-1000 requests kept alice's paused request from its slot until
    max_pause (a priority crossing principals).  Only alice's own queue may keep it paused."""
    log = DecisionLog(str(tmp_path / "d.jsonl"))
    adm = BudgetAdmission(
        decision_log=log,
        root_limits={k: v * 10 for k, v in LIMITS.items()},
        default_limits=LIMITS,
        max_pause=60.0,
        audit_quota=60,
    )
    wire, published = Wire(), []
    router = Router(
        wire,
        admission=adm,
        management=Management(adm),
        heartbeat_interval=100.0,
        publish=lambda topic, msg: published.append((topic, msg)),
    )
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    send(router, ALICE, b"A", 1, 0, 0.1)  # runs
    (low,) = wire.to(b"W")
    send(router, ALICE, b"A", 2, 10, 0.2)  # preempts it
    assert [topic for topic, _ in published] == [P.control_topic("echo", P.ControlOp.PREEMPT)]
    paused = codec.pack({"v": 1, "id": 1, "status": "paused", "spent": {}})
    router.on_message([b"W", P.MDPW, W.PARTIAL.value, low[3], b"", paused], 0.3, SVC)
    (high,) = wire.to(b"W")  # the lent slot
    for rid in range(1, 4):
        send(router, BOB, b"B", rid, 1000, 0.4)
    published.clear()
    ok = codec.pack({"v": 1, "id": 2, "status": "ok", "spent": {}})
    router.on_message([b"W", P.MDPW, W.FINAL.value, high[3], b"", ok, codec.pack(0)], 0.5, SVC)
    router.check_invariants()
    assert [t for t, _ in published] == [P.control_topic("echo", P.ControlOp.RESUME)]  # alice's resumes now
    assert not wire.to(b"W")  # bob's wait for a slot that frees
    log.close()
