"""Durable enforcement, unit tests: the segmented decision log, restore through replay, the
ledger's dump/load, and ``expire`` logged only when a lease runs out (system tests that SIGKILL
a real kernel: tests/test_kernel_crash.py)."""

from __future__ import annotations

import json

from kernel import errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog, segment_paths
from kernel.ledger import Ledger
from kernel.logstore import read_records
from kernel.replay import ReplayReport, replay_file, restore
from kernel.router import Router


def _ops(path: str) -> list[str]:
    return [rec["op"] for rec in read_records(path)]


def test_expire_is_logged_only_when_a_lease_runs_out(tmp_path):
    log = DecisionLog(str(tmp_path / "d.jsonl"))
    adm = BudgetAdmission(decision_log=log)
    router = Router(lambda frames: True, admission=adm)
    adm.decide("open", 0.0, job="j", limits={"units": 5})
    assert adm.decide("reserve", 0.0, job="j", resource="units", amount=2, lease=10.0)["ok"]
    for t in range(1, 10):
        adm.tick(router, float(t))
    log.flush()
    assert "expire" not in _ops(log.path)
    adm.tick(router, 10.5)
    log.flush()
    assert _ops(log.path).count("expire") == 1


def test_segments_snapshot_the_state_and_restore_reads_only_the_last(tmp_path):
    path = str(tmp_path / "d.jsonl")
    log = DecisionLog(path, segment_bytes=4096)
    adm = BudgetAdmission(decision_log=log)
    for n in range(200):
        adm.decide("open", float(n), job=f"j{n}", limits={"flops": 100.0, "units": 3})
        adm.decide("charge", float(n), job=f"j{n}", spent={"flops": 7.0})
        if n % 3:
            adm.decide("close", float(n), job=f"j{n}")
        else:
            adm.decide("reserve", float(n), job=f"j{n}", resource="units", amount=1, lease=1e3)
        log.flush()
    log.close()
    closed = segment_paths(path)
    assert len(closed) >= 3
    assert sum(1 for op in _ops(path) if op == "snapshot") == 1
    restored = restore(path)
    assert restored is not None and not restored.divergences
    assert restored.ledger.dump() == adm.ledger.dump()
    assert len(restored.ledger.jobs) == 2 + 67  # root, default and the jobs still open
    # The whole history replays, each snapshot checked against the state replayed up to it.
    report = ReplayReport()
    for p in closed + [path]:
        replay_file(p, report)
    assert report.snapshots == len(closed) and not report.divergences
    assert report.ledger.dump() == adm.ledger.dump()


def test_dump_and_load_take_the_same_decisions_after():
    a = Ledger(session="s.")
    a.open(0.0, job="p", limits={"wall_ms": 1000.0, "flops": 50.0, "units": 4})
    a.open(0.1, job="c", parent="p", limits={"flops": 20.0})
    a.start(0.2, job="c")
    a.reserve(0.3, job="p", resource="units", amount=2, lease=5.0)
    b = Ledger.load(json.loads(json.dumps(a.dump())))
    for led in (a, b):
        led.charge(0.4, job="c", spent={"flops": 5.0})
        led.finish(0.9, job="c")
    assert a.reserve(1.0, job="p", resource="units", amount=3) == b.reserve(1.0, job="p", resource="units", amount=3)
    assert a.expire(6.0) == b.expire(6.0) and a.dump() == b.dump()


def test_restore_keeps_owners_holders_limits_and_refuses_nothing_it_allowed(tmp_path):
    """What enforcement logs (configure, job owners, reservation ids and holders, per-principal
    default jobs) survives a snapshot and a restart; the restarted kernel's log replays whole."""
    from kernel.auth import Principal
    from kernel.mmi import Caller, Management

    alice = Principal("alice", "client")
    limits = {"root": {"flops": 1e6, "units": 10}, "default": {"flops": 1e3}}
    path = str(tmp_path / "d.jsonl")
    log = DecisionLog(path, segment_bytes=4096)
    adm = BudgetAdmission(decision_log=log, root_limits=limits["root"], default_limits=limits["default"])
    router = Router(lambda frames: True, admission=adm, management=Management(adm))
    as_alice = Caller(b"a", alice)
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "a1", "budget": {"units": 4}}, 0.0, as_alice)["ok"]
    held = router.management.handle(router, P.MMI_GATE_RESERVE,
                                    {"job": "a1", "resource": "units", "amount": 3, "lease_s": 600}, 0.0, as_alice)
    rid = held["reservation"]
    assert rid != f"{log.session}r1"  # drawn at random (an input of the logged reserve)
    adm.resolve_job(alice, None, 0.0)  # opens default:alice
    for n in range(60):  # enough decisions for snapshots
        adm.decide("open", float(n), job=f"j{n}", limits={"flops": 10.0})
        adm.decide("close", float(n), job=f"j{n}")
        log.flush()
    log.close()
    assert segment_paths(path)
    report = restore(path)
    assert report is not None and not report.divergences and report.snapshots == 1  # from a snapshot
    led = report.ledger
    assert led.dump() == adm.ledger.dump()
    assert led.owner_of("a1") == "alice" and led.owner_of("default:alice") == "alice"
    assert led.reservation_of(rid) == ("a1", "alice")
    assert led.jobs["root"].limits == {"flops": 1e6, "units": 10.0}
    # A restarted kernel with the same [limits] continues this state: no configure over it.
    log2 = DecisionLog(path, restored=True)
    adm2 = BudgetAdmission(decision_log=log2, root_limits=limits["root"], default_limits=limits["default"],
                           restored=report, restored_at=100.0)
    router2 = Router(lambda frames: True, admission=adm2, management=Management(adm2))
    assert adm2.ledger.owner_of("a1") == "alice"
    bob = Caller(b"b", Principal("bob", "client"))
    refused = router2.management.handle(router2, P.MMI_GATE_RELEASE, {"reservation": rid}, 101.0, bob)
    assert isinstance(refused, errors.RecaError)  # still alice's
    assert router2.management.handle(router2, P.MMI_GATE_RELEASE, {"reservation": rid}, 101.0, as_alice)["ok"]
    log2.close()
    assert "configure" not in _ops(path)
    assert not replay_file(path).divergences
