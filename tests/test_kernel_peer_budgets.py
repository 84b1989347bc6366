"""Per-connection byte budgets (issue 24, item 3): the pure account (kernel.quotas.PeerBudgets,
time and the transport's evidence passed in) and the router's drop of one client
(Router.drop_client).  The system tests with real connections are in
tests/test_kernel_peer_drop.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import codec, errors, quotas
from kernel import protocol as P
from kernel.quotas import IN, OUT, PeerBudgets
from kernel.router import Router
from tests.test_kernel_bounds import code, final
from tests.test_kernel_router import Wire, ready, reca, request

MIB = 1 << 20


def budgets(out: int = 8 * MIB, inb: int = 4 * MIB, grace: float = 2.0) -> PeerBudgets:
    return PeerBudgets(out, inb, grace)


def test_tcp_evidence_credits_exactly_what_left_the_process():
    b = budgets()
    acct = b.open(b"A", fd=7, ino=70, tcp=True, left=300)  # 300: the handshake, before any reply
    b.sent(acct, b"A", 5 * MIB)
    assert acct.outstanding == 5 * MIB and b"A" in b.hot  # past out / SAMPLE_SHARE: looked at
    b.sample_tcp(acct, 300 + 2 * MIB)  # 2 MiB acknowledged or queued in the OS
    assert acct.outstanding == 3 * MIB
    b.sample_tcp(acct, 300 + 2 * MIB)  # nothing more left: nothing more credited
    assert acct.outstanding == 3 * MIB
    b.sample_tcp(acct, 300 + 9 * MIB)  # framing bytes can make "left" exceed what was counted
    assert acct.outstanding == 0 and acct.credited == acct.sent
    assert b.judge(b"A", 0, now=1.0) is None and b"A" not in b.hot
    b.check_invariants()


def test_a_unix_socket_with_room_credits_what_was_sent_before_the_previous_look():
    b = budgets()
    acct = b.open(b"U", fd=8, ino=80, tcp=False, room_below=100_000)
    b.sent(acct, b"U", 3 * MIB)
    b.sample_unix(acct, room=True)  # nothing was sent before the previous (no) look
    assert acct.outstanding == 3 * MIB
    b.sent(acct, b"U", 1 * MIB)
    b.sample_unix(acct, room=False)  # queue full: the peer does not read; nothing credited
    assert acct.outstanding == 4 * MIB
    b.sent(acct, b"U", 1 * MIB)
    b.sample_unix(acct, room=True)  # room now: what was sent before the previous look has left
    assert acct.outstanding == 1 * MIB
    b.check_invariants()


def test_past_the_outbound_budget_for_the_grace_or_twice_it_at_once_the_peer_is_dropped():
    b = budgets(out=8 * MIB, grace=2.0)
    acct = b.open(b"A", fd=7, ino=70, tcp=True)
    b.sent(acct, b"A", 9 * MIB)
    assert b.judge(b"A", 0, now=10.0) is None  # past it: the grace starts
    assert b.judge(b"A", 0, now=11.9) is None
    b.sample_tcp(acct, 2 * MIB)  # caught up below the budget: the clock stops
    assert b.judge(b"A", 0, now=12.0) is None and acct.over_since is None
    b.sent(acct, b"A", 2 * MIB)
    assert b.judge(b"A", 0, now=13.0) is None
    assert b.judge(b"A", 0, now=15.0) == OUT  # past it for the whole grace
    b2 = budgets(out=8 * MIB, grace=60.0)
    other = b2.open(b"B", fd=9, ino=90, tcp=True)
    b2.sent(other, b"B", 16 * MIB)
    assert not b2.may_send(other) and b2.judge(b"B", 0, now=0.0) == OUT  # twice it: at once
    assert b2.dropped(b"B", OUT) is other and b"B" not in b2.accounts
    assert b2.stats()["dropped_out"] == 1


def test_connections_together_past_their_bound_drop_the_one_holding_the_most():
    b = PeerBudgets(8 * MIB, 4 * MIB, 2.0, total_bytes=16 * MIB)
    accts = {name: b.open(name, fd=n, ino=n, tcp=True) for n, name in enumerate([b"A", b"B", b"C"])}
    for name, mib in ((b"A", 5), (b"B", 7), (b"C", 4)):  # each under its own 8 MiB
        b.sent(accts[name], name, mib * MIB)
    assert b.total == 16 * MIB and b.largest() is None
    b.sent(accts[b"C"], b"C", 1)
    assert b.largest() == b"B"
    b.sample_tcp(accts[b"B"], 7 * MIB)  # B reads after all: credited, the total falls back
    assert b.largest() is None and b.total == 9 * MIB + 1
    b.dropped(b"A", quotas.TOTAL)
    assert b.total == 4 * MIB + 1 and b.stats()["dropped_total"] == 1
    b.check_invariants()


def test_a_slow_reader_is_paused_past_a_quarter_and_resumed_at_an_eighth():
    b = budgets(out=8 * MIB)
    acct = b.open(b"S", fd=3, ino=30, tcp=True)
    b.sent(acct, b"S", 1 * MIB)
    assert b.flow(b"S", acct, 0.0) is None
    b.sent(acct, b"S", 1 * MIB)  # 2 MiB = 8 / PAUSE_SHARE
    assert b.flow(b"S", acct, 0.0) == quotas.PAUSE and acct.paused
    b.sent(acct, b"S", 3 * MIB)  # what was on its way when the pause went out
    assert b.flow(b"S", acct, 0.1) is None  # paused once
    assert b.judge(b"S", 0, now=1.9) is None  # under the budget, paused, not yet stalled
    b.sample_tcp(acct, 1 * MIB)  # it reads: progress
    assert b.judge(b"S", 0, now=2.5) is None and b.judge(b"S", 0, now=4.4) is None
    b.sample_tcp(acct, 4 * MIB)  # 1 MiB left = 8 / RESUME_SHARE
    assert b.flow(b"S", acct, 4.5) == quotas.RESUME and not acct.paused
    b.sent(acct, b"S", 2 * MIB)
    assert b.flow(b"S", acct, 4.55) == quotas.PAUSE
    b.sample_tcp(acct, 6 * MIB)  # read at once, but a pause lasts MIN_PAUSE_S
    assert b.flow(b"S", acct, 4.6) is None and b.flow(b"S", acct, 4.55 + quotas.MIN_PAUSE_S) == quotas.RESUME
    assert b.flow(b"S", acct, 4.6) is None
    assert (b.stats()["pauses"], b.stats()["resumes"]) == (2, 2)
    # Paused and reading nothing for the grace: dropped, though under its budget.
    b.sent(acct, b"S", 2 * MIB)
    assert b.flow(b"S", acct, 10.0) == quotas.PAUSE
    assert b.judge(b"S", 0, now=11.0) is None and b.judge(b"S", 0, now=12.0) == OUT


def test_inbound_past_its_budget_is_dropped_at_once_even_without_an_account():
    b = budgets(inb=4 * MIB)
    assert b.judge(b"X", 4 * MIB, now=0.0) is None
    assert b.judge(b"X", 4 * MIB + 1, now=0.0) == IN
    b.dropped(b"X", IN)
    assert b.stats()["dropped_in"] == 1


def test_a_descriptor_carries_one_connection_and_a_close_forgets_it():
    b = budgets()
    b.open(b"old", fd=5, ino=50, tcp=True)
    b.open(b"new", fd=5, ino=51, tcp=True)  # the old connection closed, its fd reused
    assert set(b.accounts) == {b"new"}
    assert b.closed(5) == b"new" and not b.accounts and not b.by_fd
    b.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("osctuxdfp"), st.integers(0, 3), st.integers(0, 20 * MIB)), max_size=60))
def test_invariants_hold_under_any_sequence(ops):
    b = budgets()
    now = 0.0
    for op, peer, n in ops:
        ident, now = bytes([peer]), now + 0.5
        acct = b.accounts.get(ident)
        if op == "o":
            b.open(ident, fd=peer % 3, ino=n, tcp=bool(n % 2))
        elif op == "c":
            b.closed(peer % 3)
        elif op == "f":
            b.forget(ident)
        elif acct is None:
            continue
        elif op == "s":
            b.sent(acct, ident, n)
        elif op == "t":
            b.sample_tcp(acct, n)
        elif op == "u":
            b.sample_unix(acct, bool(n % 2))
        elif op == "x" and b.judge(ident, n // 4, now) is not None:
            b.dropped(ident, OUT)
        elif op == "d":
            b.dropped(ident, IN)
        elif op == "p":
            b.flow(ident, acct, now)
        b.check_invariants()


# -- the router's side: every request of a dropped client answered once, its work cancelled -----


def test_drop_client_answers_each_of_its_requests_once_and_cancels_its_running_work():
    wire = Wire()
    orders = []
    r = Router(wire, publish=lambda topic, msg: orders.append((topic, msg)))
    ready(r, b"W1")
    request(r, b"BAD", body=[reca(1), codec.pack("running")])  # dispatched to W1
    (running,) = wire.to(b"W1")
    request(r, b"BAD", body=[reca(2), b"q" * 1000])  # queued behind it
    request(r, b"OK", body=[reca(3), b"q" * 10])
    assert r.held_by(b"BAD") > 1000 and 10 < r.held_by(b"OK") < 1000
    exc = errors.Overloaded("connection dropped", quota=quotas.OUT)
    assert r.drop_client(b"BAD", exc, now=1.0) == 2
    answers = wire.to(b"BAD")
    assert [code(m) for m in answers] == ["overloaded", "overloaded"]
    assert {codec.unpack(m[4])["error"].get("quota") for m in answers} == {quotas.OUT}
    assert r.held_by(b"BAD") == 0
    cancels = [msg for topic, msg in orders if topic.endswith(P.ControlOp.CANCEL.value.encode())]
    assert [m[P.C_TOKEN] for m in cancels] == [running[3]]  # the running one's worker is told
    r.check_invariants()
    final(r, b"W1", running, now=2.0)  # its late FINAL is dropped; the slot goes to OK's request
    assert wire.to(b"BAD") == []
    (dispatched,) = [m for m in wire.to(b"W1") if m[2] == P.WorkerCmd.REQUEST.value]
    assert dispatched[-1] == b"q" * 10
    r.check_invariants()
