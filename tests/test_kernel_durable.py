"""Durable enforcement: a crash is never a way around a budget (issue 14).

Unit tests of the segmented decision log and the ledger's dump/load; system tests that SIGKILL
a real kernel and start another on the same runtime directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import pytest

from clients import Client
from kernel import errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog, segment_paths
from kernel.ledger import Ledger
from kernel.replay import ReplayReport, replay_lines, restore
from kernel.router import Router
from tests.support import REPO, KernelProcess, service_block, short_tmpdir


def _ops(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["op"] for line in fh if line.strip()]


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
        with open(p, encoding="utf-8") as fh:
            replay_lines(fh, report)
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


def _kernel(runtime: str) -> KernelProcess:
    return KernelProcess(service_block("echo", "services.echo"), runtime_dir=runtime)


@pytest.mark.system
def test_a_kernel_crash_resets_no_budget():
    runtime = short_tmpdir()
    k = _kernel(runtime)
    try:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            c.open_job("exp", {"flops": 10_000, "units": 5})
            c.call("echo", {"steps": 3, "step_ms": 1}, job="exp")  # spends 3,000 flops
            c.mmi(P.MMI_GATE_RESERVE, {"job": "exp", "resource": "units", "amount": 2, "lease_s": 600})
            before = c.mmi(P.MMI_JOB_STATS, {"job": "exp"})
    finally:
        k.kill()
    k2 = _kernel(runtime)
    try:
        assert any("restored" in line for line in k2.lines)
        with Client(k2.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            after = c.mmi(P.MMI_JOB_STATS, {"job": "exp"})
            assert after["spent"]["flops"] == before["spent"]["flops"] == 3000
            assert after["remaining"]["units"] == 3  # the held reservation came back with its lease
            with pytest.raises(errors.Refused):
                c.reserve("exp", "units", 4)
            with pytest.raises(errors.BadRequest):
                c.open_job("exp", {"flops": 1e9})  # no fresh budget by re-opening
            assert c.call("echo", {"steps": 2, "step_ms": 1}, job="exp") is not None  # not "unknown job"
            assert c.mmi(P.MMI_JOB_STATS, {"job": "exp"})["spent"]["flops"] == 5000
        out = subprocess.run([sys.executable, "-m", "kernel", "replay", k2.decision_log], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "divergences 0" in out.stdout
    finally:
        k2.stop()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.system
def test_a_request_in_flight_at_the_crash_is_not_run_twice():
    runtime = short_tmpdir()
    k = _kernel(runtime)
    result: dict = {}
    try:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)

            def call() -> None:
                with Client(k.endpoint, timeout=3, retries=6) as slow:
                    try:
                        result["value"] = slow.call("echo", {"steps": 100, "step_ms": 100}, idem="once-only")
                    except errors.RecaError as exc:
                        result["error"] = exc

            t = threading.Thread(target=call)
            t.start()
            while c.stats()["services"]["echo"]["inflight"] < 1:
                pass  # bounded by the pytest timeout; the call starts within milliseconds
            k.kill()
        k = _kernel(runtime)
        t.join(60)
        assert not t.is_alive()
        assert isinstance(result.get("error"), errors.KernelRestarted), result
        with Client(k.endpoint, timeout=10, retries=0) as c:
            assert c.stats()["ledger"].get("interrupted_retries", 0) >= 1
    finally:
        k.stop()
        shutil.rmtree(runtime, ignore_errors=True)
