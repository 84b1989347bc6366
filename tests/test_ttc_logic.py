"""The transaction state machine on a real SQLite log, time passed in, no processes."""

from __future__ import annotations

import json

import pytest

from services.ttc import errors
from services.ttc.logic import (ABORTED, COMMITTED, DONE, FAILED, PREPARED, RUNNING, LocalGate, RunFacts,
                                TransactionManager)
from services.ttc.store import Store
from services.ttc.tools import default_registry

T0 = 1_000_000.0
SAT = {"n_vars": 50, "seed": 7}


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "ttc.db")


@pytest.fixture
def tm(db):
    store = Store(db)
    yield TransactionManager(store, default_registry(), LocalGate({"cpu_s": 100.0}), manager_id="m1")
    store.close()


def reopen(tm: TransactionManager, manager_id: str, gate: LocalGate | None = None) -> TransactionManager:
    """Simulate a crash: drop the connection without any clean-up and open the file again."""
    path = tm.store.path
    tm.store.close()
    return TransactionManager(Store(path), default_registry(), gate or LocalGate({"cpu_s": 100.0}),
                              manager_id=manager_id)


def run_to_done(tm: TransactionManager, call_id: str, now: float, value=None):
    ticket = tm.claim_run(call_id, now=now)
    tm.run_started(call_id, ticket.attempt, 4242, 4242, 1, now=now)
    return tm.run_finished(call_id, ticket.attempt, now=now + 1, result={"ok": True, "value": value or {"x": 1}},
                           end_status="exit:0", cpu_s=0.5)


def test_prepare_records_without_running_and_reserves(tm):
    cid = tm.prepare("sat", SAT, 3.0, ["step1"], 10.0, now=T0)
    out = tm.outcome(cid)
    assert out.state == PREPARED and out.attempts == 0 and out.result is None
    assert tm.gate.used["cpu_s"] == 3.0
    assert tm.store.all("SELECT * FROM runs") == []
    assert [e["op"] for e in tm.store.audit_log(cid)] == ["prepare"]


def test_commit_schedules_and_result_attaches_once_per_consumer(tm):
    cid = tm.prepare("sat", SAT, 3.0, ["a", "b"], 10.0, now=T0)
    assert tm.commit(cid, now=T0 + 1).state == COMMITTED
    assert tm.runnable() == [cid]
    ticket = tm.claim_run(cid, now=T0 + 2)
    assert ticket.attempt == 1 and ticket.cpu_limit_s == 4 and tm.outcome(cid).state == RUNNING
    assert tm.claim_run(cid, now=T0 + 2) is None  # at most one open run per call
    out = tm.run_finished(cid, 1, now=T0 + 3, result={"ok": True, "value": {"sat": True}}, end_status="exit:0",
                          cpu_s=1.5)
    assert out.state == DONE and out.result["value"] == {"sat": True}
    assert tm.gate.used["cpu_s"] == 0.0
    assert [d.call_id for d in tm.deliver("a", now=T0 + 4)] == [cid]
    assert tm.attach(cid, "a", now=T0 + 5) is True
    assert tm.attach(cid, "a", now=T0 + 6) is False
    assert tm.deliver("a", now=T0 + 7) == []
    assert [d.delivered_count for d in tm.deliver("b", now=T0 + 7)] == [1]
    assert [d.delivered_count for d in tm.deliver("b", now=T0 + 8)] == [2]  # unacked: redelivered
    assert tm.attach(cid, "b", now=T0 + 9) is True


def test_commit_without_consumer_aborts_with_reason(tm):
    cid = tm.prepare("sat", SAT, 3.0, ["a"], 10.0, now=T0)
    aborted, kills = tm.withdraw("a", now=T0 + 1)
    assert aborted == [cid] and kills == []
    assert tm.outcome(cid).reason == "no_consumer" and tm.gate.used["cpu_s"] == 0.0
    with pytest.raises(errors.Aborted) as exc:
        tm.commit(cid, now=T0 + 2)
    assert exc.value.code == "aborted" and exc.value.detail["reason"] == "no_consumer"


def test_withdraw_keeps_calls_that_still_have_a_consumer(tm):
    shared = tm.prepare("sat", SAT, 1.0, ["a", "b"], 10.0, now=T0)
    only_a = tm.prepare("sat", {"n_vars": 60, "seed": 1}, 1.0, ["a"], 10.0, now=T0)
    aborted, _ = tm.withdraw("a", now=T0 + 1)
    assert aborted == [only_a]
    assert tm.outcome(shared).state == PREPARED and tm.consumers(shared) == ["b"]


def test_withdraw_mid_run_returns_the_run_to_kill(tm):
    cid = tm.prepare("sat", SAT, 1.0, ["a"], 10.0, now=T0)
    tm.commit(cid, now=T0)
    ticket = tm.claim_run(cid, now=T0)
    tm.run_started(cid, 1, 555, 555, 99, now=T0)
    aborted, kills = tm.withdraw("a", now=T0 + 1)
    assert aborted == [cid] and [(k.tag, k.pid, k.pgid, k.start_token) for k in kills] == [(ticket.tag, 555, 555, 99)]
    # the late result of the killed attempt is logged and discarded
    out = tm.run_finished(cid, 1, now=T0 + 2, result={"ok": True, "value": 1}, end_status="signal:SIGKILL")
    assert out.state == ABORTED and out.result is None
    assert tm.store.audit_log(cid)[-1]["op"] == "late_run_end"


def test_presumed_abort_on_expire_and_on_late_commit(tm):
    a = tm.prepare("sat", SAT, 1.0, ["x"], 5.0, now=T0)
    b = tm.prepare("sat", {"n_vars": 60, "seed": 2}, 1.0, ["x"], 5.0, now=T0)
    assert tm.expire(now=T0 + 4.9) == [] and tm.outcome(a).state == PREPARED
    tm.expire(now=T0 + 5.0)
    assert tm.outcome(a).state == ABORTED and tm.outcome(a).reason == "timeout"
    assert tm.outcome(b).reason == "timeout"
    c = tm.prepare("sat", {"n_vars": 70, "seed": 3}, 1.0, ["x"], 5.0, now=T0 + 10)
    with pytest.raises(errors.Aborted) as exc:
        tm.commit(c, now=T0 + 15)
    assert exc.value.detail["reason"] == "timeout" and tm.gate.used["cpu_s"] == 0.0


def test_run_past_wall_deadline_fails_and_is_killed(tm):
    cid = tm.prepare("sat", SAT, 1.0, ["x"], 5.0, now=T0)
    tm.commit(cid, now=T0)
    ticket = tm.claim_run(cid, now=T0)
    assert tm.expire(now=ticket.wall_deadline - 0.1) == []
    kills = tm.expire(now=ticket.wall_deadline)
    assert [k.tag for k in kills] == [ticket.tag]
    out = tm.outcome(cid)
    assert out.state == FAILED and out.reason == "run_timeout" and out.result["ok"] is False


def test_idempotent_prepare_and_commit_retry_never_runs_twice(tm):
    cid = tm.prepare("sat", SAT, 1.0, ["x"], 10.0, idem_key="k1", now=T0)
    assert tm.prepare("sat", SAT, 1.0, ["x"], 10.0, idem_key="k1", now=T0 + 1) == cid
    assert tm.gate.used["cpu_s"] == 1.0  # the replay reserved nothing more
    with pytest.raises(errors.IdempotencyConflict):
        tm.prepare("sat", {"n_vars": 51, "seed": 7}, 1.0, ["x"], 10.0, idem_key="k1", now=T0 + 1)
    tm.commit(cid, now=T0 + 1, idem_key="k1")
    first = run_to_done(tm, cid, T0 + 2)
    again = tm.commit(cid, now=T0 + 5, idem_key="k1")
    assert again == first and tm.runnable() == []
    assert len(tm.store.all("SELECT * FROM runs WHERE call_id=?", (cid,))) == 1
    with pytest.raises(errors.AlreadyCommitted) as exc:
        tm.commit(cid, now=T0 + 6)
    assert exc.value.code == "already_committed" and exc.value.detail["state"] == DONE


def test_bad_input_gets_typed_errors_and_records_nothing(tm):
    cases = [
        (lambda: tm.prepare("nope", {}, 1.0, ["x"], 5.0, now=T0), "unknown_tool"),
        (lambda: tm.prepare("sat", {"n_vars": 2, "seed": 1}, 1.0, ["x"], 5.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", {"n_vars": 50}, 1.0, ["x"], 5.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", {"n_vars": 50, "seed": 1, "bogus": 1}, 1.0, ["x"], 5.0, now=T0),
         "precondition_failed"),
        (lambda: tm.prepare("sat", SAT, -1.0, ["x"], 5.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", SAT, float("nan"), ["x"], 5.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", SAT, 1.0, [], 5.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", SAT, 1.0, "x", 5.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", SAT, 1.0, ["x"], 0.0, now=T0), "precondition_failed"),
        (lambda: tm.prepare("sat", {"clauses": [[1, 2]] * 60000}, 1.0, ["x"], 5.0, now=T0), "too_large"),
        (lambda: tm.prepare("subprocess", {"argv": ["rm", "-rf", "/"]}, 1.0, ["x"], 5.0, now=T0),
         "precondition_failed"),
        (lambda: tm.prepare("sat", SAT, 200.0, ["x"], 5.0, now=T0), "budget_refused"),
        (lambda: tm.commit("no-such-call", now=T0), "unknown_call"),
        (lambda: tm.abort(17, now=T0), "unknown_call"),
    ]
    for fn, code in cases:
        with pytest.raises(errors.TtcError) as exc:
            fn()
        assert exc.value.code == code, (code, exc.value)
        assert exc.value.to_wire()["code"] == code
    assert tm.calls() == [] and tm.gate.used.get("cpu_s", 0.0) == 0.0
    # the service keeps serving after every refusal
    cid = tm.prepare("sat", SAT, 1.0, ["x"], 5.0, now=T0)
    assert tm.outcome(cid).state == PREPARED


def test_commit_of_aborted_and_abort_of_finished(tm):
    cid = tm.prepare("sat", SAT, 1.0, ["x"], 10.0, now=T0)
    assert tm.abort(cid, now=T0 + 1) == []
    assert tm.abort(cid, now=T0 + 2) == []  # idempotent
    with pytest.raises(errors.Aborted):
        tm.commit(cid, now=T0 + 3)
    done = tm.prepare("sat", {"n_vars": 60, "seed": 9}, 1.0, ["x"], 10.0, now=T0)
    tm.commit(done, now=T0)
    run_to_done(tm, done, T0 + 1)
    with pytest.raises(errors.AlreadyFinished):
        tm.abort(done, now=T0 + 5)
    with pytest.raises(errors.NotDelivered):
        tm.attach(cid, "x", now=T0 + 5)
    with pytest.raises(errors.NotDelivered):
        tm.attach(done, "someone-else", now=T0 + 5)


def test_lost_run_retries_if_retriable_else_fails(tm):
    cid = tm.prepare("sat", SAT, 1.0, ["x"], 10.0, now=T0)
    tm.commit(cid, now=T0)
    for attempt in (1, 2):
        assert tm.claim_run(cid, now=T0).attempt == attempt
        out = tm.run_finished(cid, attempt, now=T0 + 1, result=None, end_status="signal:SIGKILL")
        assert out.state == COMMITTED
    tm.claim_run(cid, now=T0)
    out = tm.run_finished(cid, 3, now=T0 + 1, result=None, end_status="signal:SIGKILL")
    assert out.state == FAILED and out.reason == "run_lost"  # max_attempts reached
    sub = tm.prepare("subprocess", {"argv": ["true"]}, 1.0, ["x"], 10.0, now=T0)
    tm.commit(sub, now=T0)
    tm.claim_run(sub, now=T0)
    out = tm.run_finished(sub, 1, now=T0 + 1, result=None, end_status="signal:SIGKILL")
    assert out.state == FAILED and out.reason == "run_lost"  # never re-run a program with side effects
    cpu = tm.prepare("sat", {"n_vars": 80, "seed": 1}, 1.0, ["x"], 10.0, now=T0)
    tm.commit(cpu, now=T0)
    tm.claim_run(cpu, now=T0)
    out = tm.run_finished(cpu, 1, now=T0 + 1, result=None, end_status="cpu_limit")
    assert out.state == FAILED and out.reason == "cpu_limit"
    # failures are results: each consumer is told exactly once
    assert sorted(d.call_id for d in tm.deliver("x", now=T0 + 2)) == sorted([cid, sub, cpu])


def test_crash_between_every_step_recovers_consistently(tm):
    """Close and reopen the log after each step of the sequence; recovery decides every call."""
    keep = tm.prepare("sat", SAT, 1.0, ["a"], 100.0, idem_key="keep", now=T0)
    stale = tm.prepare("sat", {"n_vars": 60, "seed": 1}, 1.0, ["a"], 5.0, now=T0)
    lost = tm.prepare("sat", {"n_vars": 61, "seed": 1}, 1.0, ["a"], 100.0, now=T0)
    finished = tm.prepare("sat", {"n_vars": 62, "seed": 1}, 1.0, ["a"], 100.0, now=T0)
    for cid in (lost, finished):
        tm.commit(cid, now=T0 + 1)
        tm.claim_run(cid, now=T0 + 1)
    tags = {r["call_id"]: r["tag"] for r in tm.store.all("SELECT call_id, tag FROM runs")}
    tm = reopen(tm, "m2")
    assert tm.outcome(lost).state == RUNNING  # the log kept everything
    facts = {tags[lost]: RunFacts(alive=True),
             tags[finished]: RunFacts(alive=False, result={"ok": True, "value": {"sat": True}}, cpu_s=0.3)}
    report = tm.recover(now=T0 + 10, facts=facts)
    assert [k.tag for k in report.kills] == [tags[lost]]
    assert report.retried == [lost] and report.ingested == [finished] and report.aborted == [stale]
    assert tm.outcome(keep).state == PREPARED
    assert tm.outcome(finished).state == DONE and tm.outcome(finished).result["value"] == {"sat": True}
    assert tm.outcome(lost).state == COMMITTED
    # the fresh gate was re-armed for the calls that are still live
    assert tm.gate.used["cpu_s"] == 2.0
    assert tm.recover(now=T0 + 11, facts={}).kills == []  # recovery is idempotent
    tm = reopen(tm, "m3")
    ticket = tm.claim_run(lost, now=T0 + 12)
    assert ticket.attempt == 2 and ticket.tag != tags[lost]
    tm.commit(keep, now=T0 + 12, idem_key="keep")
    assert tm.commit(keep, now=T0 + 13, idem_key="keep").state == COMMITTED  # retry after crash: same outcome
    assert [d.call_id for d in tm.deliver("a", now=T0 + 14)] == [finished]
    tm = reopen(tm, "m4")
    assert [d.delivered_count for d in tm.deliver("a", now=T0 + 15)] == [2]  # not acked: redelivered
    assert tm.attach(finished, "a", now=T0 + 16)
    tm = reopen(tm, "m5")
    assert tm.deliver("a", now=T0 + 17) == [] and not tm.attach(finished, "a", now=T0 + 18)
    tm.store.close()


def test_recover_aborts_calls_the_gate_no_longer_funds(tm):
    a = tm.prepare("sat", SAT, 3.0, ["x"], 100.0, now=T0)
    b = tm.prepare("sat", {"n_vars": 60, "seed": 1}, 3.0, ["x"], 100.0, now=T0 + 1)
    tm = reopen(tm, "m2", LocalGate({"cpu_s": 4.0}))
    report = tm.recover(now=T0 + 2, facts={})
    assert report.aborted == [b] and tm.outcome(b).reason == "budget_lost" and tm.outcome(a).state == PREPARED
    assert tm.gate.used["cpu_s"] == 3.0
    tm.store.close()


def test_audit_records_every_decision_and_forwards_it(db):
    seen = []
    store = Store(db)
    tm = TransactionManager(store, default_registry(), audit_sink=seen.append)
    cid = tm.prepare("sat", SAT, 1.0, ["x"], 10.0, now=T0)
    tm.commit(cid, now=T0 + 1)
    tm.abort(cid, now=T0 + 2)
    tm.audit({"op": "kernel_preempt", "t": T0 + 3, "inputs": {"job": "j"}})
    log = store.audit_log()
    assert [e["op"] for e in log] == ["prepare", "commit", "abort", "kernel_preempt"]
    assert [e["op"] for e in seen] == [e["op"] for e in log]
    assert log[2]["outputs"] == {"state": ABORTED, "reason": "requested", "from": COMMITTED}
    assert log[0]["inputs"]["consumers"] == ["x"] and log[1]["t"] == T0 + 1
    with pytest.raises(errors.PreconditionFailed):
        tm.audit({"no": "op"})
    raw = store.one("SELECT inputs FROM calls WHERE call_id=?", (cid,))[0]
    assert json.loads(raw) == SAT
    store.close()
