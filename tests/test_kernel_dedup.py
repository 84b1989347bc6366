"""Exactly-once requests: the idempotency table (:mod:`kernel.dedup`, fake clock, hypothesis
state machine) — attach while in flight, the stored FINAL within the TTL, bounded memory,
restored from decision-log records."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kernel.dedup import Attempt, Dedup

A = ("alice", "k1")


def test_attach_then_replay_then_expire():
    d = Dedup(ttl=10.0)
    assert d.seen(A, 0.0) == ("run", None)
    d.start(A, b"t1")
    assert d.seen(A, 1.0) == ("attach", b"t1")
    assert d.attach(b"t1", Attempt(b"c2", None, 7))
    attempts, stored = d.finish(b"t1", 2.0, [b"status", b"payload"], b"echo")
    assert attempts == [Attempt(b"c2", None, 7)] and stored.body == [b"status", b"payload"]
    kind, got = d.seen(A, 5.0)
    assert kind == "replay" and got.body == [b"status", b"payload"] and got.service == b"echo"
    assert d.seen(A, 12.5) == ("run", None)  # past the TTL: forgotten
    d.check_invariants()


def test_keys_are_per_principal():
    d = Dedup()
    d.start(("alice", "k"), b"t1")
    assert d.seen(("bob", "k"), 0.0) == ("run", None)


def test_kernel_errors_are_not_stored():
    d = Dedup()
    d.start(A, b"t1")
    d.attach(b"t1", Attempt(b"c2", None, 1))
    attempts, stored = d.finish(b"t1", 1.0, None, b"echo")
    assert len(attempts) == 1 and stored is None
    assert d.seen(A, 1.5) == ("run", None)  # a retry after worker_died runs again


def test_memory_is_bounded():
    d = Dedup(max_entries=3, max_bytes=100, max_final_bytes=40)
    for i in range(10):
        d.start(("p", str(i)), bytes([i]))
        d.finish(bytes([i]), float(i), [b"x" * 30], b"s")
        d.check_invariants()
    assert len(d.done) == 3 and d.stored_bytes == 90
    d.start(("p", "big"), b"B")
    _, stored = d.finish(b"B", 11.0, [b"y" * 41], b"s")
    assert stored.body is None and d.counters["too_large"] == 1  # remembered as run, body dropped
    d.check_invariants()


def test_attached_attempts_are_bounded():
    d = Dedup(max_attached=2)
    d.start(A, b"t")
    assert d.attach(b"t", Attempt(b"a", None, 1)) and d.attach(b"t", Attempt(b"b", None, 2))
    assert not d.attach(b"t", Attempt(b"c", None, 3))


def test_restored_from_records():
    d = Dedup(ttl=100.0)
    d.start(A, b"t")
    d.finish(b"t", 0.0, [b"\x00\xff", b"ok"], b"echo")
    d.start(("bob", "old"), b"u")
    d.finish(b"u", -95.0, [b"late"], b"echo")  # expires at 5.0
    records = d.dump()
    fresh = Dedup(ttl=100.0)
    assert fresh.load(records + [{"junk": 1}, "nonsense"], 10.0) == 1
    kind, got = fresh.seen(A, 10.0)
    assert kind == "replay" and got.body == [b"\x00\xff", b"ok"]
    assert fresh.seen(("bob", "old"), 10.0) == ("run", None)


class DedupMachine(RuleBasedStateMachine):
    """Random starts, attaches, finishes, sweeps and time: the invariants hold after each step
    and a key is never both running and replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Dedup(ttl=5.0, max_entries=4, max_bytes=64, max_final_bytes=20, max_attached=3)
        self.now = 0.0
        self.n = 0

    @rule(p=st.sampled_from(["a", "b"]), k=st.sampled_from(["1", "2", "3"]))
    def request(self, p, k):
        kind, what = self.d.seen((p, k), self.now)
        if kind == "run":
            self.n += 1
            self.d.start((p, k), str(self.n).encode())
        elif kind == "attach":
            self.d.attach(what, Attempt(b"c", None, self.n))
        else:
            assert (p, k) not in self.d.running

    @rule(size=st.integers(0, 30), kernel_error=st.booleans())
    def finish_one(self, size, kernel_error):
        if self.d.key_of:
            token = next(iter(self.d.key_of))
            self.d.finish(token, self.now, None if kernel_error else [b"z" * size], b"s")

    @rule(dt=st.floats(0, 4))
    def tick(self, dt):
        self.now += dt
        self.d.sweep(self.now)

    @invariant()
    def invariants(self):
        self.d.check_invariants()
        assert not set(self.d.running) & {k for k, s in self.d.done.items() if s.expires > self.now}


TestDedupMachine = DedupMachine.TestCase
TestDedupMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
