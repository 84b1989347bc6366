"""Unit tests of authority and ownership in the kernel's pure parts: the Ledger, BudgetAdmission
and the management handlers, driven through a Router with principals and a fake clock."""

from __future__ import annotations

import pytest

from kernel import codec, errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.auth import Principal
from kernel.decisions import DecisionLog
from kernel.ledger import Ledger
from kernel.mmi import Caller, Management
from kernel.logstore import read_records
from kernel.replay import replay_file
from kernel.router import Router
from tests.test_kernel_router import Wire

OP = Principal("op", "operator")
ALICE = Principal("alice", "client")
BOB = Principal("bob", "client")
SVC = Principal("svc", "service:echo")
W = P.WorkerCmd
LIMITS = {"wall_ms": 1e6, "cpu_ms": 1e6, "tokens": 1e6, "flops": 1e9}


@pytest.fixture
def kern(tmp_path):
    log = DecisionLog(str(tmp_path / "d.jsonl"))
    adm = BudgetAdmission(decision_log=log, root_limits={k: v * 10 for k, v in LIMITS.items()},
                          default_limits=LIMITS, max_pause=5.0, audit_quota=60)
    wire = Wire()
    router = Router(wire, admission=adm, management=Management(adm), heartbeat_interval=100.0)
    yield router, wire, adm, log
    log.close()


def call(router, who, name, arg, now=0.0):
    return router.management.handle(router, name, arg, now, caller=Caller(who.name.encode(), who))


def request(router, who, client, job=None, now=0.0, budget=None, rid=1):
    header = {"v": 1, "id": rid}
    if job is not None:
        header["job"] = job
    if budget is not None:
        header["budget"] = budget
    router.on_message([client, P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack(header), codec.pack(0)],
                      now, who)


def error_of(wire, client):
    msgs = wire.to(client)
    return codec.unpack(msgs[-1][4])["error"]["code"] if msgs else None


def replays(log) -> bool:
    log.flush()
    report = replay_file(log.path)
    return report.divergences == [] and report.replayed > 0


# -- the ledger --------------------------------------------------------------------------------

def test_close_is_refused_while_requests_run_and_no_charge_crosses_a_reopen():
    L = Ledger()
    L.open(0.0, "j", limits={"wall_ms": 1000}, owner="alice")
    L.open(0.0, "c", parent="j", owner="bob")
    assert L.jobs["c"].owner == "alice"  # a child belongs to its parent's owner
    L.start(0.0, "c")
    refused = L.close(0.1, "j")
    assert not refused["ok"] and "1 request(s) in flight" in refused["message"]
    L.finish(0.5, "c")
    assert L.close(0.6, "j")["ok"]
    L.open(0.7, "j", limits={"wall_ms": 1000}, owner="alice")
    L.start(0.7, "j")
    assert L.jobs["j"].running == 1 and L.jobs["j"].wall_running == 1  # the old job's finish is gone
    assert L.next_deadline() == pytest.approx(1.7)


@pytest.mark.parametrize("priority", [10 ** 9, 1e300, "7", True, 2.5, -1001, None])
def test_job_priority_must_be_a_bounded_integer(priority):
    out = Ledger().open(0.0, "j", priority=priority)
    assert not out["ok"] and out["code"] == "bad_request"


@pytest.mark.parametrize("limits", [{"flops": float("inf")}, {"flops": float("nan")}, {"flops": -1},
                                    {"flops": 1e301}, {"flops": True}, {"flops": "9"}])
def test_job_limits_must_be_finite(limits):
    assert Ledger().open(0.0, "j", limits=limits)["code"] == "bad_request"


def test_configure_makes_root_and_default_finite():
    L = Ledger()
    assert L.configure(0.0, root={"flops": 100}, default={"flops": 40})["ok"]
    assert L.remaining(L.jobs["root"], "flops", 0.0) == 60
    assert L.open(0.0, "big", limits={"flops": 61})["code"] == "budget_exceeded"
    assert L.admit(0.0, "default", {"flops": 1e9})["granted"]["flops"] == 40
    assert not L.configure(0.0, root={"flops": 10}, default={"flops": 40})["ok"]


def test_reservation_ids_and_holders_are_inputs():
    L = Ledger(session="s.")
    L.open(0.0, "g", limits={"protos": 3})
    out = L.reserve(0.0, "g", "protos", 1, reservation="s.abc", holder="alice")
    assert out["reservation"] == "s.abc" and L.reservation_of("s.abc") == ("g", "alice")
    again = L.reserve(0.0, "g", "protos", 1, reservation="s.abc", holder="bob")  # an id in use is never reused
    assert again["reservation"] != "s.abc" and L.reservation_of(again["reservation"]) == ("g", "bob")


# -- authority and ownership through the management handlers -----------------------------------

def test_operations_below_the_callers_role_are_forbidden_and_logged(kern):
    router, _, adm, log = kern
    for who in (ALICE, SVC):
        for name, arg in ((P.MMI_PROC_STOP, {"child": "x"}), (P.MMI_CONTROL, {"op": "fidelity", "message": {}})):
            assert isinstance(call(router, who, name, arg), errors.Forbidden)
    assert isinstance(call(router, ALICE, P.MMI_AUDIT, {"source": "alice", "events": [{}]}), errors.Forbidden)
    log.flush()
    forbidden = [r for r in read_records(log.path) if r["op"] == "forbidden"]
    assert len(forbidden) == 5 and any(r["in"].get("principal") == "alice" for r in forbidden)


def test_jobs_belong_to_their_opener(kern):
    router, wire, _, log = kern
    assert call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a", "budget": {"flops": 10, "protos": 2}})["ok"]
    for name, arg in ((P.MMI_JOB_CLOSE, {"job": "a"}), (P.MMI_JOB_OPEN, {"job": "b", "parent": "a"}),
                      (P.MMI_GATE_RESERVE, {"job": "a", "resource": "protos"}),
                      (P.MMI_CANCEL, {"job": "a"}), (P.MMI_PREEMPT, {"job": "a"}), (P.MMI_JOB_STATS, {"job": "a"})):
        out = call(router, BOB, name, arg)
        gone = call(router, BOB, name, {**arg, **({"job": "nosuch"} if "job" in arg else {"parent": "nosuch"})})
        assert isinstance(out, errors.Forbidden) and (type(gone), gone.message.replace("nosuch", "a")) == \
            (type(out), out.message), name  # the same answer whether the job exists or not
    request(router, BOB, b"B", job="a")
    assert error_of(wire, b"B") == "forbidden"
    assert "a" not in call(router, BOB, P.MMI_JOB_STATS, {}) and "a" in call(router, OP, P.MMI_JOB_STATS, {})
    assert call(router, OP, P.MMI_JOB_CLOSE, {"job": "a"})["ok"]  # an operator may
    assert replays(log)


def test_a_service_acts_in_a_job_only_while_serving_one_of_its_requests(kern):
    router, wire, _, _ = kern
    call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a", "budget": {"protos": 2}})
    reserve = {"job": "a", "resource": "protos", "commit": True}
    assert isinstance(call(router, SVC, P.MMI_GATE_RESERVE, reserve), errors.Forbidden)
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    request(router, ALICE, b"A", job="a")
    (dispatched,) = wire.to(b"W")
    assert call(router, SVC, P.MMI_GATE_RESERVE, reserve)["ok"]
    status = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
    router.on_message([b"W", P.MDPW, W.FINAL.value, dispatched[3], b"", status, codec.pack(0)], 0.1, SVC)
    assert isinstance(call(router, SVC, P.MMI_GATE_RESERVE, reserve, 0.2), errors.Forbidden)


def test_reservations_of_others_look_unknown(kern):
    router, _, _, log = kern
    call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a", "budget": {"protos": 2}})
    rid = call(router, ALICE, P.MMI_GATE_RESERVE, {"job": "a", "resource": "protos"})["reservation"]
    other = call(router, ALICE, P.MMI_GATE_RESERVE, {"job": "a", "resource": "protos"})["reservation"]
    assert len(rid) > 32 and rid[:-32] == other[:-32] and rid != other  # random beyond the session prefix
    for name in (P.MMI_GATE_RELEASE, P.MMI_GATE_COMMIT):
        real = call(router, BOB, name, {"reservation": rid})
        fake = call(router, BOB, name, {"reservation": rid[:-1] + "x"})
        assert (real.code, real.message.replace(rid, "")) == (fake.code, fake.message.replace(rid[:-1] + "x", ""))
    assert call(router, BOB, P.MMI_GATE_RENEW, {"reservations": [rid]}) == {"ok": True, "renewed": [], "unknown": [rid]}
    assert call(router, ALICE, P.MMI_GATE_RELEASE, {"reservation": rid})["ok"]
    assert replays(log)


def test_tokens_of_others_look_unknown(kern):
    router, wire, _, _ = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    request(router, ALICE, b"A")
    (dispatched,) = wire.to(b"W")
    token = dispatched[3]
    assert len(token) == 16
    for name in (P.MMI_PREEMPT, P.MMI_RESUME, P.MMI_CANCEL):
        real = call(router, BOB, name, {"token": token})
        fake = call(router, BOB, name, {"token": bytes(16)})
        assert (type(real), real.message) == (type(fake), fake.message)
        assert call(router, ALICE, name, {"token": token})["targets"] == 1
    # by id: only the caller's own requests, even from the same routing id
    assert isinstance(router.management.handle(router, P.MMI_CANCEL, {"id": 1}, 0.0, caller=Caller(b"A", BOB)),
                      errors.Refused)


def test_each_principal_has_its_own_default_job(kern):
    router, wire, adm, log = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo", codec.pack({"capacity": 2})], 0.0, SVC)
    request(router, ALICE, b"A", budget={"tokens": 5})
    (dispatched,) = wire.to(b"W")
    assert codec.unpack(dispatched[5])["job"] == "default:alice"
    assert adm.ledger.owner_of("default:alice") == "alice"
    assert adm.ledger.jobs["default:alice"].limits == LIMITS
    request(router, OP, b"O", rid=2)
    (dispatched,) = wire.to(b"W")
    assert codec.unpack(dispatched[5])["job"] == "default"
    assert replays(log)


def test_worker_charges_are_clamped_to_the_grant(kern):
    router, wire, adm, _ = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a", "budget": {"tokens": 1000}})
    request(router, ALICE, b"A", job="a", budget={"tokens": 100})
    (dispatched,) = wire.to(b"W")
    status = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {"tokens": 1e15}})
    router.on_message([b"W", P.MDPW, W.FINAL.value, dispatched[3], b"", status, codec.pack(0)], 0.1, SVC)
    assert error_of(wire, b"A") == "budget_exceeded"
    assert adm.ledger.jobs["a"].spent["tokens"] == 100


def test_a_paused_request_is_resumed_after_max_pause(kern):
    router, wire, adm, log = kern
    published = []
    router.publish = lambda topic, msg: published.append((topic, msg))
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    request(router, ALICE, b"A")
    (dispatched,) = wire.to(b"W")
    token = dispatched[3]
    paused = codec.pack({"v": 1, "id": 1, "status": P.STATUS_PAUSED, "spent": {}})
    router.on_message([b"W", P.MDPW, W.PARTIAL.value, token, b"", paused, codec.pack(0)], 1.0, SVC)
    assert router.next_wakeup() <= 6.0
    router.tick(5.9)
    assert not any(t.endswith(b"/resume") for t, _ in published)
    router.tick(6.0)
    (resume,) = [m for t, m in published if t == P.control_topic("echo", P.ControlOp.RESUME)]
    assert resume[P.C_TOKEN] == token
    assert adm.counters["resumes"] == 1 and not adm._paused_at


def test_a_kernel_preempted_request_resumed_after_max_pause_repays_its_lent_slot(kern):
    router, wire, adm, _ = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    request(router, OP, b"L", rid=1)  # priority 0, takes the only slot
    (low,) = wire.to(b"W")
    router.on_message([b"H", P.MDPC, P.ClientCmd.REQUEST.value, b"echo",
                       codec.pack({"v": 1, "id": 2, "priority": 5}), codec.pack(0)], 0.1, OP)
    paused = codec.pack({"v": 1, "id": 1, "status": P.STATUS_PAUSED, "spent": {}})
    router.on_message([b"W", P.MDPW, W.PARTIAL.value, low[3], b"", paused, codec.pack(0)], 0.2, SVC)
    (high,) = wire.to(b"W")  # the lent slot went to the high-priority request
    router.tick(5.2)  # max_pause: the low one resumes while the high one still runs
    assert adm.paused_count == 0 and adm._slot_debt == {b"W": 1}
    ok = codec.pack({"v": 1, "id": 2, "status": "ok", "spent": {}})
    router.on_message([b"W", P.MDPW, W.FINAL.value, high[3], b"", ok, codec.pack(0)], 5.3, SVC)
    assert adm._slot_debt == {} and len(router.services[b"echo"].ready) == 0  # repaid, not freed
    router.on_message([b"W", P.MDPW, W.FINAL.value, low[3], b"", ok, codec.pack(0)], 5.4, SVC)
    assert len(router.services[b"echo"].ready) == 1  # capacity 1, as declared


def test_audit_quota_is_a_token_bucket_per_principal(kern):
    router, _, _, _ = kern
    ttc = Principal("ttc", "service:ttc")
    ev = [{"x": 1}] * 40
    assert call(router, ttc, P.MMI_AUDIT, {"source": "ttc", "events": ev}, 0.0)["logged"] == 40
    refused = call(router, ttc, P.MMI_AUDIT, {"source": "ttc", "events": ev}, 0.0)
    assert isinstance(refused, errors.Refused) and "quota" in refused.message
    assert call(router, OP, P.MMI_AUDIT, {"source": "kernel-ops", "events": ev}, 0.0)["ok"]  # its own bucket
    assert call(router, ttc, P.MMI_AUDIT, {"source": "ttc", "events": ev}, 20.0)["ok"]  # 20 s refill 20
    big = call(router, ttc, P.MMI_AUDIT, {"source": "ttc", "events": [{"b": "x" * P.MAX_AUDIT_BYTES}]}, 100.0)
    assert isinstance(big, errors.BadRequest)


def test_the_wall_deadline_heap_stays_bounded():
    """Every request re-arms its job's wall deadline; superseded entries must not pile up now
    that every job (default included) has a wall limit."""
    L = Ledger()
    L.configure(0.0, root=LIMITS, default=LIMITS)
    for i in range(5000):
        t = i * 1e-3
        L.admit(t, "default", None, start=True)
        L.finish(t + 5e-4, "default")
    assert len(L._wall_heap) <= 64 + 2 * len(L.jobs)
    L.start(10.0, "default")
    assert L.next_deadline() == pytest.approx(10.0 + L.remaining(L.jobs["default"], "wall_ms", 10.0) / 1000)


def test_a_service_serving_a_job_may_pause_that_jobs_requests(kern):
    """ids pauses a caller's decode by its token: allowed while it serves a request of that job."""
    router, wire, _, _ = kern
    ids = Principal("ids", "service:ids")
    router.on_message([b"D", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    router.on_message([b"I", P.MDPW, W.READY.value, b"ids"], 0.0, ids)
    call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a"})
    request(router, ALICE, b"A", job="a")
    (decode,) = wire.to(b"D")
    assert isinstance(call(router, ids, P.MMI_PREEMPT, {"token": decode[3]}), errors.Refused)  # not serving "a" yet
    router.on_message([b"A2", P.MDPC, P.ClientCmd.REQUEST.value, b"ids", codec.pack({"v": 1, "id": 2, "job": "a"}),
                       codec.pack(0)], 0.1, ALICE)
    assert wire.to(b"I")
    assert call(router, ids, P.MMI_PREEMPT, {"token": decode[3]})["targets"] == 1
    assert call(router, ALICE, P.MMI_PREEMPT, {"token": decode[3]})["targets"] == 1  # the job's owner
    assert isinstance(call(router, BOB, P.MMI_PREEMPT, {"token": decode[3]}), errors.Refused)


def _requests_to(wire, worker):
    return [m for m in wire.to(worker) if m[2] == W.REQUEST.value]


def test_a_request_paused_by_its_owner_gives_its_slot_back_after_the_bound_and_owes_it_on_resume(kern):
    router, wire, adm, log = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    request(router, ALICE, b"A")  # takes the only slot
    (mine,) = _requests_to(wire, b"W")
    paused = codec.pack({"v": 1, "id": 1, "status": P.STATUS_PAUSED, "spent": {}})
    router.on_message([b"W", P.MDPW, W.PARTIAL.value, mine[3], b"", paused, codec.pack(0)], 0.5, SVC)
    request(router, BOB, b"B", now=0.6)  # queues: the paused request keeps its slot within the bound
    assert not _requests_to(wire, b"W")
    router.check_invariants()
    assert router.next_wakeup() <= 0.5 + adm.pause_slot
    router.tick(0.5 + adm.pause_slot)  # past the bound with bob queued: the slot goes to bob
    (bobs,) = _requests_to(wire, b"W")
    router.check_invariants()
    assert adm.counters["slots_given_back"] == 1 and adm.paused_count == 1
    # the owner resumes it: it runs at once, and its worker owes the slot bob holds
    resumed = codec.pack({"v": 1, "id": 1, "status": P.STATUS_RESUMED, "spent": {}})
    router.on_message([b"W", P.MDPW, W.PARTIAL.value, mine[3], b"", resumed, codec.pack(0)], 2.0, SVC)
    assert adm._slot_debt == {b"W": 1} and adm.paused_count == 0
    router.check_invariants()
    request(router, BOB, b"B", now=2.1, rid=2)  # queued: the worker is at capacity (2 running, 1 owed)
    ok = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": {}})
    router.on_message([b"W", P.MDPW, W.FINAL.value, bobs[3], b"", ok, codec.pack(0)], 3.0, SVC)
    assert not _requests_to(wire, b"W")  # the freed slot repays the debt
    assert adm._slot_debt == {}
    router.on_message([b"W", P.MDPW, W.FINAL.value, mine[3], b"", ok, codec.pack(0)], 3.5, SVC)
    assert len(_requests_to(wire, b"W")) == 1  # bob's second request gets the slot
    router.check_invariants()
    assert replays(log)


def test_an_owner_paused_request_past_the_bound_gives_its_slot_to_the_next_request_that_queues(kern):
    router, wire, adm, _ = kern
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo"], 0.0, SVC)
    request(router, ALICE, b"A")
    (mine,) = _requests_to(wire, b"W")
    paused = codec.pack({"v": 1, "id": 1, "status": P.STATUS_PAUSED, "spent": {}})
    router.on_message([b"W", P.MDPW, W.PARTIAL.value, mine[3], b"", paused, codec.pack(0)], 0.5, SVC)
    router.tick(0.5 + adm.pause_slot)  # nobody queued: it keeps its slot
    assert adm.counters.get("slots_given_back", 0) == 0
    request(router, BOB, b"B", now=5.0)
    assert len(_requests_to(wire, b"W")) == 1 and adm.counters["slots_given_back"] == 1
    router.check_invariants()
