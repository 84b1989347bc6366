"""Unit tests of the budget ledger, the supervisor's pure policies and the config parser."""

from __future__ import annotations


import pytest
from hypothesis import given, settings, strategies as st

from kernel import errors
from kernel.config import ConfigError, parse
from kernel.decisions import DecisionLog
from kernel.ledger import Ledger
from kernel.logstore import decode_record, encode_record, iter_records
from kernel.replay import replay_file, replay_lines
from kernel.supervisor import Backoff, RestartIntensity, RestartType, should_restart


def test_request_budget_is_clamped_to_what_the_job_has_left():
    L = Ledger()
    assert L.open(0.0, "j", limits={"tokens": 100})["ok"]
    L.charge(0.1, "j", {"tokens": 70})
    out = L.admit(0.2, "j", {"tokens": 1000})
    assert out["ok"] and out["granted"]["tokens"] == 30


def test_exhaustion_refuses_new_work():
    L = Ledger()
    L.open(0.0, "j", limits={"flops": 10})
    assert L.charge(0.1, "j", {"flops": 10})["exhausted"] == ["j"]
    out = L.admit(0.2, "j", None)
    assert not out["ok"] and out["code"] == "budget_exceeded"


def test_child_is_carved_from_parent_and_cannot_overspend_it():
    L = Ledger()
    L.open(0.0, "p", limits={"tokens": 100})
    assert L.open(0.0, "c1", parent="p", limits={"tokens": 60})["ok"]
    refused = L.open(0.0, "c2", parent="p", limits={"tokens": 50})
    assert not refused["ok"] and refused["code"] == "budget_exceeded"
    assert L.open(0.0, "c2", parent="p", limits={"tokens": 40})["ok"]
    assert L.admit(0.0, "p", {"tokens": 1})["granted"]["tokens"] == 0 or not L.admit(0.0, "p", {"tokens": 1})["ok"]
    L.charge(0.1, "c1", {"tokens": 20})
    L.close(0.2, "c1")  # 40 unspent tokens return to the parent
    assert L.admit(0.3, "p", {"tokens": 100})["granted"]["tokens"] == 40


def test_child_without_own_limit_draws_on_parent():
    L = Ledger()
    L.open(0.0, "p", limits={"tokens": 10})
    L.open(0.0, "c", parent="p")
    assert L.charge(0.1, "c", {"tokens": 10})["exhausted"] == ["p"]
    assert not L.admit(0.2, "c", None)["ok"]


def test_wall_budget_runs_out_at_the_exact_time_with_concurrency():
    L = Ledger()
    L.open(0.0, "j", limits={"wall_ms": 1000})
    L.start(0.0, "j")
    L.start(0.2, "j")  # two running: the remaining 800 ms of budget last 0.4 s
    deadline = L.next_deadline()
    assert deadline == pytest.approx(0.6)
    assert L.tick(deadline - 0.01)["exhausted"] == []
    assert L.tick(deadline)["exhausted"] == ["j"]


def test_counted_resource_running_out_refuses_reservations_but_not_work():
    L = Ledger()
    L.open(0.0, "g", limits={"prototypes": 2})
    assert L.reserve(0.0, "g", "prototypes", commit=True)["ok"]
    assert L.reserve(0.0, "g", "prototypes", commit=True)["ok"]
    out = L.reserve(0.0, "g", "prototypes", commit=True)
    assert not out["ok"] and out["code"] == "refused"
    assert L.admit(0.1, "g", None)["ok"]


def test_reservation_commit_release_and_lease_expiry():
    L = Ledger()
    L.open(0.0, "g", limits={"escalations": 1})
    r = L.reserve(0.0, "g", "escalations", lease=5.0)
    assert r["ok"]
    assert not L.reserve(0.0, "g", "escalations")["ok"]  # held
    assert L.expire(5.0)["released"] == [r["reservation"]]
    r2 = L.reserve(5.1, "g", "escalations")
    assert L.commit(5.2, r2["reservation"])["ok"]
    assert not L.release(5.3, r2["reservation"])["ok"]  # already committed
    assert not L.reserve(5.4, "g", "escalations")["ok"]


def test_renewal_keeps_a_live_holders_units_and_a_dead_holders_units_come_back():
    L = Ledger()
    L.open(0.0, "g", limits={"cpu_s": 10})
    live = L.reserve(0.0, "g", "cpu_s", 4, lease=3.0)["reservation"]
    dead = L.reserve(0.0, "g", "cpu_s", 4, lease=3.0)["reservation"]
    for t in (2.0, 4.0, 6.0, 8.0):  # the live holder renews every two seconds, the dead one never
        out = L.renew(t, [live], lease=3.0)
        assert out == {"ok": True, "renewed": [live], "unknown": []}
        L.expire(t + 0.5)
    assert L.reserve(9.0, "g", "cpu_s", 6)["ok"]  # the dead holder's 4 came back, the live 4 did not
    assert not L.reserve(9.0, "g", "cpu_s", 1)["ok"]
    assert L.renew(9.5, [dead, live], lease=3.0) == {"ok": True, "renewed": [live], "unknown": [dead]}
    assert L.release(9.6, live)["released"] == 4
    assert L.renew(9.7, [live])["unknown"] == [live]  # released: not renewable
    L2 = Ledger()
    L2.open(0.0, "g", limits={"u": 1})
    r = L2.reserve(0.0, "g", "u", lease=1.0)["reservation"]
    assert L2.renew(1.0, [r])["unknown"] == [r]  # lapsed at 1.0 even though expire did not run yet


def test_lease_bounds_and_malformed_renewals_are_refused():
    L = Ledger()
    L.open(0.0, "g")
    for lease in (0.0, -1, float("nan"), 1e9, True, "30"):
        assert L.reserve(0.0, "g", "u", lease=lease)["code"] == "bad_request"
        assert L.renew(0.0, [], lease=lease)["code"] == "bad_request"
    assert L.renew(0.0, "r1")["code"] == "bad_request"
    assert L.renew(0.0, [1, 2])["code"] == "bad_request"


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(0, 20), ops=st.lists(st.tuples(st.sampled_from(["reserve", "commit", "release", "take"]),
                                                       st.integers(1, 3)), max_size=60))
def test_gate_never_over_grants(cap, ops):
    """Whatever the interleaving of callers, granted units never exceed the cap."""
    L = Ledger()
    L.open(0.0, "g", limits={"u": cap})
    held: list[tuple[str, int]] = []
    committed = 0
    for i, (op, n) in enumerate(ops):
        t = i * 0.01
        if op == "reserve":
            out = L.reserve(t, "g", "u", n)
            if out["ok"]:
                held.append((out["reservation"], n))
        elif op == "take":
            if L.reserve(t, "g", "u", n, commit=True)["ok"]:
                committed += n
        elif op == "commit" and held:
            rid, k = held.pop(0)
            assert L.commit(t, rid)["ok"]
            committed += k
        elif op == "release" and held:
            rid, _ = held.pop()
            assert L.release(t, rid)["ok"]
        assert committed + sum(k for _, k in held) <= cap


def test_malformed_inputs_are_refused_not_raised():
    L = Ledger()
    assert L.open(0.0, "", limits={})["code"] == "bad_request"
    assert L.open(0.0, "j", limits={"tokens": -1})["code"] == "bad_request"
    assert L.open(0.0, "j", limits={"tokens": float("nan")})["code"] == "bad_request"
    assert L.open(0.0, "j", parent="nope")["code"] == "refused"
    assert L.admit(0.0, "unknown", None)["code"] == "refused"
    L.open(0.0, "j")
    assert L.reserve(0.0, "j", "u", amount=0)["code"] == "bad_request"
    assert L.reserve(0.0, "j", "u", amount=True)["code"] == "bad_request"


def test_replay_reproduces_every_decision_and_reports_divergence(tmp_path):
    path = tmp_path / "log.jsonl"
    log = DecisionLog(str(path))
    L = Ledger(session=log.session)

    def do(op, now, **kw):
        out = getattr(L, op)(now, **kw)
        log.append(op, now, kw, out)

    do("open", 0.0, job="a", limits={"tokens": 50, "wall_ms": 100})
    do("admit", 0.01, job="a", budget={"tokens": 80})
    do("start", 0.01, job="a")
    do("charge", 0.02, job="a", spent={"tokens": 30})
    do("reserve", 0.03, job="a", resource="x", amount=1, lease=0.5)
    do("tick", 0.2)
    do("admit", 0.21, job="a", budget=None)
    do("renew", 0.3, reservations=[f"{log.session}r1", "r1"], lease=0.5)  # "r1": another kernel's id
    do("expire", 0.9)
    log.append("audit", 0.95, {"source": "ttc:x", "event": {"seq": 1, "op": "prepare"}}, {"ok": True})
    log.close()
    lines = [raw for _, raw in iter_records(path.read_bytes())]
    report = replay_lines(lines)
    assert report.replayed == 9 and report.observed == 1 and not report.divergences
    renewed = decode_record(lines[8])
    assert renewed["op"] == "renew" and renewed["out"]["unknown"] == ["r1"]
    # Tamper with one recorded decision: replay must notice.
    rec = decode_record(lines[2])
    rec["out"]["granted"]["tokens"] = 80
    lines[2] = encode_record(rec)
    report = replay_lines(lines)
    assert len(report.divergences) == 1 and report.divergences[0]["op"] == "admit"


def test_restart_intensity_window():
    ri = RestartIntensity(3, 10.0)
    assert [ri.allow(t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert ri.allow(10.5)  # the first restart left the window


def test_restart_types():
    assert should_restart(RestartType.PERMANENT, 0)
    assert not should_restart(RestartType.TRANSIENT, 0) and should_restart(RestartType.TRANSIENT, -9)
    assert not should_restart(RestartType.TEMPORARY, 1)


def test_backoff_doubles_and_resets_after_a_stable_run():
    b = Backoff(0.1, 1.0, stable_after=5.0)
    assert [b.next_delay(0.1) for _ in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert b.next_delay(6.0) == 0.1


def test_config_parse_and_errors():
    cfg = parse({"kernel": {"endpoint": "tcp://127.0.0.1:5555"},
                 "service": [{"name": "echo", "module": "services.echo", "replicas": 2}]}, runtime="/tmp/x")
    assert cfg.control == "tcp://127.0.0.1:5556"
    assert [s.name for s in cfg.services] == ["echo#0", "echo#1"]
    for bad in ({"kernel": {"heartbeat_s": "fast"}}, {"service": [{"name": "x"}]},
                {"service": [{"name": "x", "module": "m", "restart": "sometimes"}]}, {"nonsense": {}},
                {"kernel": {"liveness": 0}}):
        with pytest.raises(ConfigError):
            parse(bad, runtime="/tmp/x")


def test_reserve_up_to_grants_what_is_left_and_replays(tmp_path):
    from kernel.admission import BudgetAdmission
    from kernel.mmi import Management
    from kernel import protocol as P
    from kernel.router import Router

    log = DecisionLog(str(tmp_path / "d.jsonl"))
    admission = BudgetAdmission(decision_log=log)
    router = Router(lambda frames: None, admission=admission, management=Management(admission))
    call = lambda name, arg, now: router.management.handle(router, name, arg, now)  # noqa: E731
    assert call(P.MMI_JOB_OPEN, {"job": "g", "budget": {"protos": 5}}, 0.0)["ok"]
    out = call(P.MMI_GATE_RESERVE, {"job": "g", "resource": "protos", "amount": 3, "up_to": True}, 0.1)
    assert out["granted"] == 3 and out["remaining"] == 2
    out = call(P.MMI_GATE_RESERVE, {"job": "g", "resource": "protos", "amount": 4, "up_to": True,
                                    "commit": True}, 0.2)
    assert out["granted"] == 2 and out["committed"] == 2 and out["remaining"] == 0
    refused = call(P.MMI_GATE_RESERVE, {"job": "g", "resource": "protos", "amount": 1, "up_to": True}, 0.3)
    assert isinstance(refused, errors.Refused)
    # without up_to the same ask is all or nothing
    assert isinstance(call(P.MMI_GATE_RESERVE, {"job": "g", "resource": "protos", "amount": 1}, 0.4), errors.Refused)
    log.close()
    report = replay_file(log.path)
    assert report.replayed >= 5 and report.divergences == []


def test_reserve_up_to_of_a_fractional_amount_grants_the_fraction_left():
    L = Ledger()
    L.open(0.0, "g", limits={"gpu_s": 1.5})
    out = L.reserve(0.0, "g", "gpu_s", 2.0, up_to=True)
    assert out["ok"] and out["granted"] == 1.5
    assert "granted" not in L.reserve(0.0, "g", "other", 1.0)  # plain answers are unchanged


@pytest.mark.parametrize("x", [True, False, 0, 7, -0.0, 2.0, 2.5, 1e308, 10**30 + 1])
def test_the_round_fast_path_gives_what_round_gives_type_included(x):
    """``_r`` skips ``round(x, 6)`` for an integral value; a bool is not one it may return as it is
    (``round(True, 6)`` is the int 1; found by review)."""
    from kernel.ledger import _r

    want = round(x, 6)
    got = _r(x)
    assert (type(got), got) == (type(want), want)


def test_a_bool_amount_is_granted_as_the_int_round_makes_of_it():
    led = Ledger()
    led.configure(0.0, root={"gpu_ms": 1000})
    out = led.admit(0.0, "default", {"gpu_ms": True})
    assert out["ok"] is True
    assert type(out["granted"]["gpu_ms"]) is int and out["granted"]["gpu_ms"] == 1
