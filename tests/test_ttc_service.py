"""System tests of ``ttc`` through a real ``python -m kernel``: the service process, its tool
workers, the kernel's gate holding the budget, typed errors on bad input, and an idempotent commit
retried after the service is SIGKILLed (the supervisor restarts it with a new PID)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import psutil
import pytest
import zmq

from clients import Client
from clients.core import raise_for
from kernel import errors
from services.ttc import checker
from services.ttc.tools import random_3sat
from tests.support import KernelProcess, service_block, short_tmpdir
from kernel.logstore import read_records

pytestmark = pytest.mark.system

#: Bound on every wait of these tests (seconds).
WAIT_S = 30.0
#: A diffusion run of about a second on this machine: long enough to be caught RUNNING.
LONG_RUN = {"n": 64, "steps": 30000, "checkpoint_every": 2000}
#: Lease of the service's kernel reservations in these tests (renewed every third of it).
GATE_LEASE_S = 1.5


@pytest.fixture(scope="module")
def kern():
    d = short_tmpdir("ttc-db-")
    db = os.path.join(d, "ttc.db")
    # A short gate lease: every test also exercises the renewal of held reservations.
    k = KernelProcess(service_block("ttc", "services.ttc", args=["--db", db, "--gate-lease", str(GATE_LEASE_S)]),
                      heartbeat=0.2, liveness=10)
    k.db = db
    try:
        yield k
    finally:
        k.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def client(kern):
    c = Client(kern.endpoint, timeout=WAIT_S, retries=0, context=zmq.Context.instance())
    c.wait_for_service("ttc", WAIT_S)
    yield c
    c.close()


def ttc(c: Client, op: str, **kw):
    return c.call("ttc", {"op": op, **kw})


def ttc_pid(c: Client) -> int:
    return {ch["name"]: ch["pid"] for ch in c.stats()["children"]}["ttc"]


def audit_ops(c: Client, call_id: str) -> list[str]:
    return [e["op"] for e in ttc(c, "audit", call_id=call_id)["events"]]


def remaining_cpu(c: Client, job: str) -> float:
    return c.call("mmi.job.stats", {"job": job})["remaining"]["cpu_s"]


def test_prepare_commit_result_end_to_end_with_a_real_sat_instance(client, kern):
    client.open_job("e2e", {"cpu_s": 100})
    inputs = {"n_vars": 120, "seed": 6}  # satisfiable (PicoSAT)
    prep = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": inputs, "est_cost": 5,
                               "consumers": ["planner"]}, job="e2e")
    assert prep["state"] == "PREPARED"
    assert remaining_cpu(client, "e2e") == 95  # held in the kernel's gate, nothing spent
    assert "run_claimed" not in audit_ops(client, prep["call_id"])  # prepare runs nothing
    states = []
    out = client.call("ttc", {"op": "commit", "call_id": prep["call_id"], "wait": True},
                      on_partial=lambda r: states.append(r.payload["state"]))
    assert out["state"] == "DONE" and states[-1] == "DONE" and "RUNNING" in states
    value = out["result"]["value"]
    assert value["sat"] is True
    truth = {abs(lit): lit > 0 for lit in value["model"]}
    assert all(any(truth[abs(lit)] == (lit > 0) for lit in clause) for clause in random_3sat(120, 4.26, 6))
    assert remaining_cpu(client, "e2e") == 100  # the reservation went back at the decision
    fetched = ttc(client, "result", call_id=prep["call_id"])
    assert fetched["result"] == out["result"]
    deliveries = [d for d in ttc(client, "deliver", consumer="planner")["deliveries"]
                  if d["call_id"] == prep["call_id"]]
    assert len(deliveries) == 1 and deliveries[0]["value"]["model"] == value["model"]
    assert ttc(client, "attach", call_id=prep["call_id"], consumer="planner") == {"attached": True}
    assert ttc(client, "attach", call_id=prep["call_id"], consumer="planner") == {"attached": False}
    assert all(d["call_id"] != prep["call_id"] for d in ttc(client, "deliver", consumer="planner")["deliveries"])


def test_abort_before_commit_runs_nothing_and_releases_the_budget(client):
    client.open_job("ab", {"cpu_s": 10})
    prep = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 50, "seed": 1},
                               "est_cost": 4, "consumers": ["c"]}, job="ab")
    assert remaining_cpu(client, "ab") == 6
    assert ttc(client, "abort", call_id=prep["call_id"])["state"] == "ABORTED"
    assert remaining_cpu(client, "ab") == 10
    with pytest.raises(errors.RecaError) as exc:
        ttc(client, "commit", call_id=prep["call_id"])
    assert exc.value.code == "aborted" and exc.value.detail["reason"] == "requested"
    ops = audit_ops(client, prep["call_id"])
    assert "run_claimed" not in ops and "run_started" not in ops


def test_abort_stops_a_running_tool(client):
    prep = ttc(client, "prepare", tool="diffusion", inputs=LONG_RUN, est_cost=20, consumers=["c"])
    other = Client(client.endpoint, timeout=WAIT_S, retries=0)
    try:
        for reply in client.stream("ttc", {"op": "commit", "call_id": prep["call_id"], "wait": True}):
            if not reply.final and reply.payload["state"] == "RUNNING":
                assert ttc(other, "abort", call_id=prep["call_id"], reason="plan_changed")["state"] == "ABORTED"
            if reply.final:
                assert reply.payload["state"] == "ABORTED" and reply.payload["reason"] == "plan_changed"
    finally:
        other.close()
    started = [e for e in ttc(client, "audit", call_id=prep["call_id"])["events"] if e["op"] == "run_started"]
    assert len(started) == 1
    pid = started[0]["outputs"]["pid"]
    # the abort killed the worker's process group: it is gone (or a zombie not yet reaped by the pump)
    try:
        proc = psutil.Process(pid)
        assert proc.status() == psutil.STATUS_ZOMBIE or proc.environ().get("RECA_TTC_RUN") is None
    except psutil.NoSuchProcess:
        pass


def test_withdraw_aborts_calls_left_without_consumers(client):
    only = ttc(client, "prepare", tool="sat", inputs={"n_vars": 40, "seed": 2}, est_cost=1, consumers=["w1"])
    shared = ttc(client, "prepare", tool="sat", inputs={"n_vars": 40, "seed": 3}, est_cost=1,
                 consumers=["w1", "w2"])
    assert ttc(client, "withdraw", consumer="w1") == {"aborted": [only["call_id"]]}
    assert ttc(client, "status", call_id=only["call_id"])["reason"] == "no_consumer"
    assert ttc(client, "status", call_id=shared["call_id"])["state"] == "PREPARED"
    assert ttc(client, "withdraw", consumer="w2") == {"aborted": [shared["call_id"]]}


@pytest.mark.parametrize("payload, code", [
    ({"op": "prepare", "tool": "nope", "inputs": {}, "est_cost": 1, "consumers": ["c"]}, "unknown_tool"),
    ({"op": "prepare", "tool": "sat", "inputs": {"n_vars": 1, "seed": 0}, "est_cost": 1, "consumers": ["c"]},
     "precondition_failed"),
    ({"op": "prepare", "tool": "subprocess", "inputs": {"argv": ["rm", "-rf", "/"]}, "est_cost": 1,
      "consumers": ["c"]}, "precondition_failed"),
    ({"op": "prepare", "tool": "sat", "inputs": {"n_vars": 40, "seed": 0}, "est_cost": -1, "consumers": ["c"]},
     "precondition_failed"),
    ({"op": "prepare", "tool": "sat", "inputs": {"n_vars": 40, "seed": 0}, "est_cost": 1, "consumers": []},
     "precondition_failed"),
    ({"op": "prepare", "tool": "sat", "inputs": {"clauses": [[1001, -1002, 1003]] * 20000}, "est_cost": 1,
      "consumers": ["c"]}, "too_large"),
    ({"op": "prepare", "tool": "sim", "inputs": {"case": "tsunami", "steps": 5}, "est_cost": 1, "consumers": ["c"]},
     "precondition_failed"),
    ({"op": "prepare", "tool": "sim", "inputs": {"case": "radial_dam_break", "steps": 5, "params": {"h_in": -1}},
      "est_cost": 1, "consumers": ["c"]}, "precondition_failed"),
    ({"op": "prepare", "tool": "sim", "inputs": {"case": "radial_dam_break", "steps": 5, "params": {"t_end": -1}},
      "est_cost": 1, "consumers": ["c"]}, "precondition_failed"),
    ({"op": "commit", "call_id": "no-such-call"}, "unknown_call"),
    ({"op": "attach", "call_id": "no-such-call", "consumer": "c"}, "unknown_call"),
    ({"op": "fly"}, "bad_request"),
    ({"op": "commit", "call_id": 7}, "bad_request"),
    ({"op": "result", "call_id": "x", "wait": True, "timeout": -1}, "bad_request"),
    (["not", "a", "map"], "bad_request"),
])
def test_bad_input_gets_a_typed_error_and_the_service_keeps_serving(client, payload, code):
    pid = ttc_pid(client)
    with pytest.raises(errors.RecaError) as exc:
        client.call("ttc", payload)
    assert exc.value.code == code, exc.value.message
    prep = ttc(client, "prepare", tool="sat", inputs={"n_vars": 30, "seed": 5}, est_cost=1, consumers=["k"])
    assert ttc(client, "abort", call_id=prep["call_id"])["state"] == "ABORTED"
    assert ttc_pid(client) == pid


def test_double_commit_and_commit_of_an_aborted_call(client):
    prep = ttc(client, "prepare", tool="sat", inputs={"n_vars": 60, "seed": 9}, est_cost=2, consumers=["d"],
               idem="double-1")
    first = ttc(client, "commit", call_id=prep["call_id"], idem="double-1", wait=True)
    assert first["state"] == "DONE"
    with pytest.raises(errors.RecaError) as exc:
        ttc(client, "commit", call_id=prep["call_id"])
    assert exc.value.code == "already_committed" and exc.value.detail["state"] == "DONE"
    again = ttc(client, "commit", call_id=prep["call_id"], idem="double-1")
    assert again == first
    assert audit_ops(client, prep["call_id"]).count("run_claimed") == 1


def test_budget_refused_by_the_kernel_gate(client):
    client.open_job("tiny", {"cpu_s": 3})
    with pytest.raises(errors.RecaError) as exc:
        client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 40, "seed": 0}, "est_cost": 5,
                            "consumers": ["c"]}, job="tiny")
    assert exc.value.code == "budget_refused"
    assert remaining_cpu(client, "tiny") == 3


def wait_new_pid(c: Client, old: int) -> int:
    """The supervisor's restart: poll the kernel's child table (bounded) until ``ttc`` has a new pid
    and serves again."""
    c.wait_for_service("ttc", WAIT_S)
    for _ in range(int(WAIT_S / 0.05)):
        try:
            pid = ttc(c, "stats")["pid"]
        except (errors.WorkerDied, errors.Unavailable, errors.Timeout):
            continue
        if pid != old:
            return pid
    raise AssertionError("ttc was not restarted")


def test_commit_retried_with_its_key_after_sigkill_never_runs_the_tool_twice(client, kern):
    # 1) killed after the result is durable: the retry returns it, no new run
    prep = ttc(client, "prepare", tool="sat", inputs={"n_vars": 90, "seed": 4}, est_cost=2, consumers=["r"],
               idem="retry-done")
    done = ttc(client, "commit", call_id=prep["call_id"], idem="retry-done", wait=True)
    assert done["state"] == "DONE"
    old = ttc_pid(client)
    os.kill(old, signal.SIGKILL)
    assert wait_new_pid(client, old) != old
    again = ttc(client, "prepare", tool="sat", inputs={"n_vars": 90, "seed": 4}, est_cost=2, consumers=["r"],
                idem="retry-done")
    assert again["call_id"] == prep["call_id"]
    assert ttc(client, "commit", call_id=prep["call_id"], idem="retry-done", wait=True) == done
    assert audit_ops(client, prep["call_id"]).count("run_claimed") == 1

    # 2) killed while the tool runs: the worker dies with its manager, recovery re-runs it once,
    #    the retried commit only reads the outcome
    prep = ttc(client, "prepare", tool="diffusion", inputs=LONG_RUN, est_cost=20, consumers=["r"],
               idem="retry-running")
    old = ttc_pid(client)
    with pytest.raises(errors.WorkerDied):
        for reply in client.stream("ttc", {"op": "commit", "call_id": prep["call_id"], "idem": "retry-running",
                                           "wait": True}):
            if not reply.final and reply.payload["state"] == "RUNNING":
                os.kill(old, signal.SIGKILL)
            if reply.final:
                raise_for(reply)
    wait_new_pid(client, old)
    out = ttc(client, "commit", call_id=prep["call_id"], idem="retry-running", wait=True)
    assert out["state"] == "DONE" and out["attempts"] == 2
    assert out["result"]["value"]["steps"] == LONG_RUN["steps"]
    ops = audit_ops(client, prep["call_id"])
    assert ops.count("run_claimed") == 2 and ops.count("retry") == 1 and ops.count("finish") == 1
    assert "commit_replayed" in ops
    counts = checker.check(kern.db)
    assert counts.as_dict() == {"orphaned_runs": 0, "lost_results": 0, "double_attached": 0, "stuck_calls": 0}, \
        counts.details


def test_a_prepared_call_keeps_its_budget_past_the_kernels_lease(client):
    client.open_job("lease", {"cpu_s": 10})
    prep = client.call("ttc", {"op": "prepare", "tool": "sat", "inputs": {"n_vars": 50, "seed": 2},
                               "est_cost": 3, "consumers": ["c"], "timeout": 30}, job="lease")
    time.sleep(3 * GATE_LEASE_S)  # three leases: held only because the service renews it
    assert remaining_cpu(client, "lease") == 7
    assert ttc(client, "stats")["gate"]["leases_lost"] == 0
    ttc(client, "abort", call_id=prep["call_id"])
    assert remaining_cpu(client, "lease") == 10


def test_every_decision_reaches_the_kernels_decision_log(client, kern):
    """Also after the SIGKILLs above: the forwarder resumes from its durable mark."""
    events = ttc(client, "audit")["events"]
    last = events[-1]["seq"]
    deadline = time.monotonic() + WAIT_S
    while ttc(client, "stats")["audit_forwarded_seq"] < last:
        assert time.monotonic() < deadline, "audit records not forwarded"
        time.sleep(0.05)
    client.stats()  # flushes the kernel's log
    forwarded: dict[int, dict] = {}
    for rec in read_records(kern.decision_log):
        if rec["op"] == "audit" and rec["in"]["source"].startswith("ttc:"):
            forwarded.setdefault(rec["in"]["event"]["seq"], rec["in"]["event"])
    assert all(forwarded.get(e["seq"]) == e for e in events), \
        [e["seq"] for e in events if forwarded.get(e["seq"]) != e][:10]
    assert {e["op"] for e in events} >= {"recover", "prepare", "commit", "run_claimed", "finish", "attached"}


def test_a_reservation_the_kernel_lost_is_taken_again_or_counted_lost(kern):
    """The kernel's ledger is not durable: after a restart it no longer holds the service's
    reservations.  Simulated here by releasing one behind the adapter's back."""
    from services.ttc.service import KernelGateAdapter

    with Client(kern.endpoint, timeout=WAIT_S, retries=0) as c:
        c.open_job("lost", {"cpu_s": 10})
        gate = KernelGateAdapter(lambda: Client(kern.endpoint, timeout=WAIT_S, retries=0))
        try:
            gate.job = "lost"
            assert gate.reserve("cpu_s", 4, "call-1")
            c.call("mmi.gate.release", {"reservation": gate.held["call-1"].reservation})
            assert remaining_cpu(c, "lost") == 10
            assert gate.renew() == 0 and gate.retaken == 1 and gate.leases_lost == 0
            assert remaining_cpu(c, "lost") == 6  # counted again
            c.call("mmi.gate.release", {"reservation": gate.held["call-1"].reservation})
            c.call("mmi.job.close", {"job": "lost"})
            assert gate.renew() == 0 and gate.leases_lost == 1 and "call-1" not in gate.held
            gate.release("cpu_s", 4, "call-1")  # nothing held: a no-op, no error
        finally:
            gate.close()


def test_a_sims_run_killed_mid_run_resumes_from_its_checkpoint_bit_for_bit(client, kern, tmp_path):
    """The ``sim`` tool runs a real :mod:`sims` simulation (a shallow-water dam break); SIGKILL of
    its worker after a checkpoint -> the lost run is retried and resumes from the checkpoint, and
    the final state equals an uninterrupted run's."""
    from services.ttc.tools import RunContext, run_sim

    inputs = {"case": "radial_dam_break", "blocks": 4, "cells": 32, "steps": 150, "checkpoint_every": 10}
    prep = ttc(client, "prepare", tool="sim", inputs=inputs, est_cost=30, consumers=["r"])
    call_id = prep["call_id"]
    ckpt = os.path.join(kern.db + ".d", "ckpt", call_id, "sim.npz")
    ttc(client, "commit", call_id=call_id)
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(ckpt):
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)
    pid = [e for e in ttc(client, "audit", call_id=call_id)["events"] if e["op"] == "run_started"][0]["outputs"]["pid"]
    os.kill(pid, signal.SIGKILL)
    out = ttc(client, "result", call_id=call_id, wait=True, timeout=WAIT_S)
    assert out["state"] == "DONE" and out["attempts"] == 2, out
    value = out["result"]["value"]
    assert value["steps"] == 150 and value["resumed_from"] >= 10
    reference = run_sim(inputs, RunContext(call_id, 1, str(tmp_path / "ref")))
    assert value["sha"] == reference["sha"] and value["mass"] == reference["mass"]
    ops = audit_ops(client, call_id)
    assert ops.count("run_claimed") == 2 and ops.count("retry") == 1
