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


# -- through the router (fake clock, real admission and decision log) ------------------------------

from kernel import codec  # noqa: E402
from kernel import protocol as P  # noqa: E402
from kernel.admission import BudgetAdmission  # noqa: E402
from kernel.decisions import DecisionLog  # noqa: E402
from kernel.host import FakeHost  # noqa: E402
from kernel.mmi import Management  # noqa: E402
from kernel.replay import restore  # noqa: E402
from kernel.router import Router  # noqa: E402
from tests.support import Wire  # noqa: E402


def kernel(log_path=None, restored=None):
    host = FakeHost(seed=1)
    wire = Wire()
    log = DecisionLog(log_path) if log_path else None
    adm = BudgetAdmission(decision_log=log, host=host, restored=restored, restored_at=0.0)
    router = Router(wire, admission=adm, management=Management(adm), host=host)
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 2})], 0.0)
    return router, wire, adm, log


def request(router, client: bytes, rid: int, idem: str, now: float) -> None:
    header = codec.pack({"v": 1, "id": rid, "idem": idem})
    router.on_message([client, P.MDPC, P.ClientCmd.REQUEST.value, b"echo", header, b"work"], now)


def dispatched(wire: Wire) -> list[bytes]:
    return [m[3] for m in wire.sent if m[0] == b"W" and m[2] == P.WorkerCmd.REQUEST.value]


def test_a_retry_in_flight_attaches_and_a_retry_after_gets_the_stored_final():
    router, wire, adm, _ = kernel()
    request(router, b"C1", 1, "K", 0.1)
    (token,) = dispatched(wire)
    request(router, b"C2", 7, "K", 0.2)  # the client died; its retry comes from a new socket
    assert len(dispatched(wire)) == 1  # not run again
    router.check_invariants()
    partial = codec.pack({"v": 1, "id": 1, "status": "partial"})
    router.on_message([b"W", P.MDPW, P.WorkerCmd.PARTIAL.value, token, b"", partial, b"p"], 0.3)
    final = codec.pack({"v": 1, "id": 1, "status": "ok"})
    router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, token, b"", final, b"done"], 0.4)
    router.check_invariants()
    assert [s["id"] for s in wire.to(b"C2", P.ClientCmd.PARTIAL.value)] == [7]
    (got,) = wire.to(b"C2", P.ClientCmd.FINAL.value)
    assert got["id"] == 7 and got["status"] == "ok"
    request(router, b"C3", 9, "K", 5.0)  # finished: the stored FINAL, nothing runs
    assert len(dispatched(wire)) == 1
    (again,) = wire.to(b"C3", P.ClientCmd.FINAL.value)
    assert again["id"] == 9 and again["status"] == "ok"
    assert adm.dedup.counters["attached"] == 1 and adm.dedup.counters["replayed"] == 1
    request(router, b"C4", 1, "K", 5.0 + adm.dedup.ttl + 1)  # past the TTL: a new request
    assert len(dispatched(wire)) == 2
    router.check_invariants()


def test_a_kernel_error_is_not_stored_so_the_retry_runs():
    router, wire, adm, _ = kernel()
    request(router, b"C1", 1, "K", 0.1)
    request(router, b"C2", 2, "K", 0.2)
    router.on_message([b"W", P.MDPW, P.WorkerCmd.DISCONNECT.value], 0.3)  # worker_died
    assert wire.to(b"C2", P.ClientCmd.FINAL.value)[0]["error"]["code"] == "worker_died"
    router.on_message([b"W2", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 1})], 0.4)
    request(router, b"C3", 3, "K", 0.5)
    assert len([m for m in wire.sent if m[0] == b"W2" and m[2] == P.WorkerCmd.REQUEST.value]) == 1
    router.check_invariants()


def test_keys_of_different_principals_never_meet():
    from kernel.principal import Principal

    router, wire, adm, _ = kernel()
    alice = Principal("alice", "client")
    bob = Principal("bob", "client")
    for who, client in ((alice, b"A"), (bob, b"B")):
        header = codec.pack({"v": 1, "id": 1, "idem": "same"})
        router.on_message([client, P.MDPC, P.ClientCmd.REQUEST.value, b"echo", header, b"x"], 0.1, who)
    assert len(dispatched(wire)) == 2


def test_stored_finals_survive_a_restart(tmp_path):
    path = str(tmp_path / "decisions.jsonl")
    router, wire, adm, log = kernel(path)
    request(router, b"C1", 1, "K", 0.1)
    (token,) = dispatched(wire)
    final = codec.pack({"v": 1, "id": 1, "status": "ok"})
    router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, token, b"", final, b"\x00result"], 0.4)
    log.close()
    report = restore(path)
    assert len(report.finals) == 1
    router2, wire2, adm2, log2 = kernel(path, restored=report)
    request(router2, b"C9", 5, "K", 1.0)
    assert dispatched(wire2) == []  # not run again after the restart
    (got,) = [m for m in wire2.sent if m[0] == b"C9"]
    assert codec.unpack(got[4])["id"] == 5 and got[5] == b"\x00result"
    log2.close()


# -- review findings: keys bound to principal, service and body; shares; mmi; kernel errors -------


def as_(router, who, client: bytes, rid: int, idem: str, now: float, service=b"echo", body=b"x", **extra) -> None:
    header = codec.pack({"v": 1, "id": rid, "idem": idem, **extra})
    router.on_message([client, P.MDPC, P.ClientCmd.REQUEST.value, service, header, body], now, who)


def finish(router, worker: bytes, token: bytes, now: float, status=None, payload=b"done") -> None:
    final = codec.pack(status or {"v": 1, "id": 1, "status": "ok"})
    router.on_message([worker, P.MDPW, P.WorkerCmd.FINAL.value, token, b"", final, payload], now)


def test_crash_marks_are_per_principal_so_alices_final_never_clears_bobs_key(tmp_path):
    from kernel.principal import Principal

    alice, bob = Principal("alice", "client"), Principal("bob", "client")
    path = str(tmp_path / "decisions.jsonl")
    router, wire, adm, log = kernel(path)
    as_(router, bob, b"B", 1, "order-1", 0.1)
    as_(router, alice, b"A", 1, "order-1", 0.2)
    bob_token, alice_token = dispatched(wire)
    finish(router, b"W", alice_token, 0.3)  # alice's finishes; bob's still runs when the kernel dies
    assert adm.idem_inflight == {("bob", "order-1")}
    log.close()
    report = restore(path)
    assert report.inflight_idem == {("bob", "order-1")}
    router2, wire2, adm2, log2 = kernel(path, restored=report)
    as_(router2, bob, b"B2", 2, "order-1", 1.0)
    (got,) = wire2.to(b"B2", P.ClientCmd.FINAL.value)
    assert got["error"]["code"] == "kernel_restarted"  # it may have run: not run again
    as_(router2, alice, b"A2", 2, "order-1", 1.0)
    (again,) = wire2.to(b"A2", P.ClientCmd.FINAL.value)
    assert again["status"] == "ok" and dispatched(wire2) == []  # her stored FINAL
    log2.close()


def test_an_older_logs_marks_without_a_principal_still_replay():
    from kernel.principal import Principal
    from kernel.replay import ReplayReport, replay_records

    old = [
        (1, {"op": "session", "session": "s."}),
        (2, {"op": "run", "t": 1.0, "in": {"idem": "k1"}}),
        (3, {"op": "run", "t": 1.0, "in": {"idem": "k2"}}),
        (4, {"op": "ran", "t": 2.0, "in": {"idem": "k2"}}),
    ]
    report = replay_records(old, ReplayReport())
    assert report.inflight_idem == {(None, "k1")}
    snap = [(1, {"op": "snapshot", "state": {"ledger": report.ledger.dump(), "inflight_idem": ["k3", ["bob", "k4"]]}})]
    assert replay_records(snap, ReplayReport()).inflight_idem == {(None, "k3"), ("bob", "k4")}
    router, wire, adm, _ = kernel(restored=report)
    as_(router, Principal("carol", "client"), b"C", 1, "k1", 1.0)  # no principal known: refused for anyone
    assert wire.to(b"C", P.ClientCmd.FINAL.value)[0]["error"]["code"] == "kernel_restarted"


def test_one_principals_flood_never_evicts_anothers_entries():
    d = Dedup(max_entries=100, max_bytes=10_000, principal_entries=5, principal_bytes=300)
    d.start(("alice", "a"), b"A")
    d.finish(b"A", 0.0, [b"x" * 50], b"s")
    for i in range(1000):
        d.start(("mallory", str(i)), i.to_bytes(4, "big"))
        d.finish(i.to_bytes(4, "big"), 1.0, [b"m" * 60], b"s")
    d.check_invariants()
    assert d.seen(("alice", "a"), 2.0)[0] == "replay"
    assert len(d.by_principal["mallory"]) <= 5 and d.bytes_of["mallory"] <= 300
    # past the global bound (many principals), the one holding the most loses its oldest
    g = Dedup(max_entries=6, principal_entries=4)
    for who, n in (("alice", 1), ("bob", 4)):
        for i in range(n):
            g.start((who, str(i)), f"{who}{i}".encode())
            g.finish(f"{who}{i}".encode(), 0.0, [b"x"], b"s")
    g.start(("carol", "0"), b"c0")
    g.finish(b"c0", 0.0, [b"x"], b"s")
    g.start(("carol", "1"), b"c1")
    g.finish(b"c1", 0.0, [b"x"], b"s")
    g.check_invariants()
    assert ("alice", "0") in g.done and ("bob", "0") not in g.done and len(g.done) == 6


def test_a_key_reused_with_another_service_or_body_is_a_conflict():
    from kernel.principal import Principal

    alice = Principal("alice", "client")
    router, wire, adm, _ = kernel()
    router.on_message([b"W2", P.MDPW, P.WorkerCmd.READY.value, b"echo2", codec.pack({"capacity": 1})], 0.0)
    as_(router, alice, b"A", 1, "K", 0.1)
    (token,) = dispatched(wire)
    as_(router, alice, b"B", 2, "K", 0.2, service=b"echo2")  # in flight, another service
    as_(router, alice, b"C", 3, "K", 0.2, body=b"other")  # in flight, another body
    as_(router, alice, b"D", 4, "K", 0.2)  # the same request: attaches
    for c in (b"B", b"C"):
        assert wire.to(c, P.ClientCmd.FINAL.value)[0]["error"]["code"] == "idem_conflict"
    assert wire.to(b"D", P.ClientCmd.FINAL.value) == []
    finish(router, b"W", token, 0.3)
    as_(router, alice, b"E", 5, "K", 0.4, service=b"echo2")  # finished, another service
    as_(router, alice, b"F", 6, "K", 0.4, body=b"other")
    for c in (b"E", b"F"):
        assert wire.to(c, P.ClientCmd.FINAL.value)[0]["error"]["code"] == "idem_conflict"
    assert len(dispatched(wire)) == 1 and not [
        m for m in wire.sent if m[0] == b"W2" and m[2] == P.WorkerCmd.REQUEST.value
    ]
    assert wire.to(b"D", P.ClientCmd.FINAL.value)[0]["status"] == "ok"
    router.check_invariants()


def test_the_digest_survives_a_restart_and_old_records_have_none():
    d = Dedup()
    d.start(A, b"t", b"D1")
    d.finish(b"t", 0.0, [b"ok"], b"echo")
    (rec,) = d.dump()
    fresh = Dedup()
    fresh.load([rec], 1.0)
    old = {k: v for k, v in rec.items() if k != "digest"} | {"idem": "older"}
    fresh.load([old], 1.0)
    assert fresh.seen(A, 1.0, b"D2")[0] == "conflict"
    assert fresh.seen(A, 1.0, b"D1")[0] == "replay"
    assert fresh.seen(("alice", "older"), 1.0, b"D2")[0] == "replay"  # not known: not checked


def test_a_retried_state_changing_management_call_runs_once():
    router, wire, adm, _ = kernel()
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "j", "budget": {"flops": 1e6}}, 0.0)["ok"]
    arg = codec.pack({"job": "j", "resource": "flops", "amount": 1000, "commit": True})
    for rid, client in ((1, b"C1"), (2, b"C2")):  # the client's retry: same key, fresh id
        header = codec.pack({"v": 1, "id": rid, "idem": "R"})
        router.on_message([client, P.MDPC, P.ClientCmd.REQUEST.value, P.MMI_GATE_RESERVE.encode(), header, arg], 0.1)
    first = [m for m in wire.sent if m[0] == b"C1"][0]
    second = [m for m in wire.sent if m[0] == b"C2"][0]
    assert codec.unpack(second[4])["id"] == 2 and second[5] == first[5]  # the same answer, its own id
    assert adm.ledger.jobs["j"].spent["flops"] == 1000  # charged once
    header = codec.pack({"v": 1, "id": 3, "idem": "R"})  # the same key for another call: a conflict
    other = codec.pack({"job": "j", "resource": "flops", "amount": 5, "commit": True})
    router.on_message([b"C3", P.MDPC, P.ClientCmd.REQUEST.value, P.MMI_GATE_RESERVE.encode(), header, other], 0.2)
    assert wire.to(b"C3", P.ClientCmd.FINAL.value)[0]["error"]["code"] == "idem_conflict"
    assert adm.ledger.jobs["j"].spent["flops"] == 1000


def test_a_budget_exceeded_made_at_settlement_is_not_stored():
    from kernel.principal import LOCAL_OPERATOR as op

    router, wire, adm, _ = kernel()
    as_(router, op, b"C1", 1, "K", 0.1, budget={"flops": 10})
    (token,) = dispatched(wire)
    finish(router, b"W", token, 0.2, {"v": 1, "id": 1, "status": "ok", "spent": {"flops": 1000}})
    assert wire.to(b"C1", P.ClientCmd.FINAL.value)[0]["error"]["code"] == "budget_exceeded"
    as_(router, op, b"C2", 2, "K", 0.3, budget={"flops": 10})
    assert len(dispatched(wire)) == 2  # the retry runs again
    router.check_invariants()


def test_a_request_sent_for_a_caller_is_keyed_by_the_principal_acted_for():
    from kernel.principal import Principal

    alice, bob = Principal("alice", "client"), Principal("bob", "client")
    svc = Principal("svc", "service:echo")
    router, wire, adm, _ = kernel()
    router.on_message([b"S", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 4})], 0.0, svc)
    router.on_message([b"W", P.MDPW, P.WorkerCmd.DISCONNECT.value], 0.0)  # only svc's worker serves echo
    as_(router, alice, b"A", 1, "a-call", 0.1)
    as_(router, bob, b"B", 1, "b-call", 0.1)
    served = [m for m in wire.sent if m[0] == b"S" and m[2] == P.WorkerCmd.REQUEST.value]
    assert len(served) == 2
    # the service calls on for each caller with the same key of its own: two requests, not one
    as_(router, svc, b"S1", 1, "step-1", 0.2, **{"for": "alice"})
    as_(router, svc, b"S2", 2, "step-1", 0.2, **{"for": "bob"})
    served = [m for m in wire.sent if m[0] == b"S" and m[2] == P.WorkerCmd.REQUEST.value]
    assert len(served) == 4 and wire.to(b"S2", P.ClientCmd.FINAL.value) == []
    assert ("alice", "step-1") in adm.dedup.running and ("bob", "step-1") in adm.dedup.running
    router.check_invariants()


# -- strict control: orders to nothing, unknown operations, unknown budget kinds -------------------


def test_orders_to_a_target_that_does_not_exist_are_not_found():
    from kernel import errors
    from kernel.mmi import Caller
    from kernel.principal import LOCAL_OPERATOR

    router, wire, adm, _ = kernel()
    caller = Caller(b"C", LOCAL_OPERATOR)
    for op in (P.MMI_PREEMPT, P.MMI_RESUME, P.MMI_CANCEL):
        for arg in ({"job": "no-such-job"}, {"token": "00" * 16}, {"id": 12345}):
            out = router.management.handle(router, op, arg, 0.5, caller=caller)
            assert isinstance(out, errors.NotFound) and out.code == "not_found", (op, arg, out)
    request(router, b"C", 1, "K", 0.6)  # a real target is still found
    assert router.management.handle(router, P.MMI_PREEMPT, {"id": 1}, 0.7, caller=caller)["targets"] == 1


def test_an_unknown_management_operation_is_a_typed_error():
    router, wire, adm, _ = kernel()
    header = codec.pack({"v": 1, "id": 3})
    router.on_message([b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"mmi.jobs.open", header, codec.pack({})], 0.1)
    (status,) = wire.to(b"C", P.ClientCmd.FINAL.value)
    assert status["error"]["code"] == "bad_request" and status["error"]["kind"] == "unknown_op"
    assert "mmi.job.open" in status["error"]["message"]


def test_budget_kinds_are_validated_against_the_table():
    router, wire, adm, _ = kernel()
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "g", "budget": {"protos": 5}}, 0.0)["ok"]
    for rid, budget, job in ((1, {"flopz": 10}, None), (2, {"flops": 10}, None), (3, {"protos": 1}, "g")):
        header = {"v": 1, "id": rid, "budget": budget}
        if job:
            header["job"] = job
        router.on_message([b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack(header), b"x"], 0.1)
    finals = {s["id"]: s for s in wire.to(b"C", P.ClientCmd.FINAL.value)}
    assert finals[1]["error"]["kind"] == "budget_kind" and "flopz" in finals[1]["error"]["message"]
    assert 2 not in finals and 3 not in finals  # admitted and dispatched
    assert len(dispatched(wire)) == 2


def test_a_snapshot_holds_only_the_newest_entries():
    d = Dedup()
    for i in range(30):
        d.start(("p", str(i)), bytes([i]))
        d.finish(bytes([i]), float(i), [b"x"], b"s")
    assert [r["idem"] for r in d.dump(limit=5)] == ["25", "26", "27", "28", "29"]
    assert len(d.dump()) == 30


# -- the kernel core's state machine, with retries of a few keys from any client ------------------

from hypothesis import HealthCheck  # noqa: E402
from hypothesis.stateful import rule as _rule  # noqa: E402

from tests.test_kernel_model import CLIENTS, PRINCIPALS, KernelModel  # noqa: E402


class RetryingKernel(KernelModel):
    """Core's model (random clients, workers, management calls, crashes, garbage, time) plus
    requests that reuse one of four idempotency keys from any client socket: never two requests
    of one (principal, key) in flight, at most one FINAL per (client, id), every invariant of the
    router, the admission, the ledger and the idempotency table after each step, and the decision
    log still replays to the same ledger."""

    @_rule(c=st.integers(0, 2), k=st.integers(0, 3), service=st.sampled_from([b"a", b"b"]))
    def retry(self, c, k, service) -> None:
        self.rid += 1
        header = {"v": 1, "id": self.rid, "idem": f"retry{k}"}
        self.router.on_message(
            [CLIENTS[c], P.MDPC, P.ClientCmd.REQUEST.value, service, codec.pack(header), b"x"], self.now, PRINCIPALS[c]
        )
        self.seen["retry"] += 1

    @invariant()
    def one_request_per_key(self) -> None:
        if not hasattr(self, "router"):
            return
        keys = [
            (r.principal.name, r.checked.idem)
            for r in self.router.inflight.values()
            if r.checked is not None and r.checked.idem is not None
        ]
        assert len(keys) == len(set(keys)), f"one key in flight twice: {keys}"


RetryingKernel.TestCase.settings = settings(
    max_examples=30, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRetryingKernel = RetryingKernel.TestCase


def test_a_retry_with_the_same_body_for_another_job_budget_or_txn_is_a_conflict_naming_it():
    """Issue 25: the same key and body but another job (or budget, txn) is not the same request —
    attaching it would answer it with work charged to the first job — so it gets ``idem_conflict``
    naming the part; another request id, priority or deadline attaches (they only schedule the run)."""
    from kernel.mmi import Caller
    from kernel.principal import Principal

    alice = Principal("alice", "client")
    router, wire, adm, _ = kernel()
    for job in ("j1", "j2"):
        opened = router.management.handle(
            router, P.MMI_JOB_OPEN, {"job": job, "budget": {"flops": 1e9}}, 0.0, Caller(b"A", alice)
        )
        assert opened["ok"]
    as_(router, alice, b"A", 1, "K", 0.1, job="j1")
    (token,) = dispatched(wire)
    as_(router, alice, b"B", 2, "K", 0.2, job="j2")  # another job
    as_(router, alice, b"C", 3, "K", 0.2)  # no job: the caller's default job, not j1
    as_(router, alice, b"D", 4, "K", 0.2, job="j1", budget={"flops": 5})
    as_(router, alice, b"E", 5, "K", 0.2, job="j1", txn="t1")
    as_(router, alice, b"F", 6, "K", 0.2, job="j1", priority=1, deadline=5000)  # attaches
    wanted = {b"B": ["job"], b"C": ["job"], b"D": ["budget"], b"E": ["txn"]}
    for c, parts in wanted.items():
        (err,) = wire.to(c, P.ClientCmd.FINAL.value)
        assert err["error"]["code"] == "idem_conflict" and err["error"]["differs"] == parts
        assert parts[0] in err["error"]["message"]
    assert wire.to(b"F", P.ClientCmd.FINAL.value) == []
    finish(router, b"W", token, 0.3)
    assert wire.to(b"F", P.ClientCmd.FINAL.value)[0]["status"] == "ok"
    as_(router, alice, b"G", 7, "K", 0.4, job="j2")  # finished: the stored FINAL is j1's
    assert wire.to(b"G", P.ClientCmd.FINAL.value)[0]["error"]["differs"] == ["job"]
    as_(router, alice, b"H", 8, "K", 0.4, job="j1", priority=3)
    assert wire.to(b"H", P.ClientCmd.FINAL.value)[0]["status"] == "ok"
    assert len(dispatched(wire)) == 1  # ran once
    router.check_invariants()


def test_digest_parts_name_what_differs():
    from kernel.dedup import BOUND, differing, digest
    from kernel.mdp import Header

    base = digest(b"s", [b"x"], Header({}, job="j", budget={"flops": 1}))
    assert len(base) == 8 * len(BOUND)
    assert differing(base, digest(b"s", [b"x"], Header({}, job="j", budget={"flops": 1.0}))) == []
    assert differing(base, digest(b"s", [b"x"], Header({}, job="j", budget={"flops": 1}, id=9, priority=2))) == []
    assert differing(base, digest(b"t", [b"y"], Header({}, job="k"))) == ["service", "body", "job", "budget"]
    assert differing(base, digest(b"s", [b"x"], Header({}, job="j", budget={"flops": 1}, on_behalf="bob"))) == ["for"]
    assert differing(base, b"0" * 16) == [] and differing(None, base) == []  # an older log's digest: not checked
