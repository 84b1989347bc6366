"""The ``sparkvm`` service under a real kernel: the ``vm_steps`` budget is granted, charged and
capped by the kernel; hostile tapes are stopped and billed; the decisions replay."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types

import pytest

from kernel import errors
from services.sparkvm.service import SparkVM
from spark import tapes
from tests.support import REPO, client_fixture, kernel_fixture, service_block
from kernel.logstore import read_records

kern = kernel_fixture(
    service_block("sparkvm", "services.sparkvm")
    + service_block(
        "sparkvmk", "services.sparkvm", args=["--name", "sparkvmk", "--enforce", "kernel", "--slice", "256"]
    )
    + service_block("echo", "services.echo")
)
client = client_fixture("sparkvm", "sparkvmk", "echo")


def spent(client, job):
    return client.call("mmi.job.stats", {"job": job})["spent"].get("vm_steps", 0.0)


def test_a_chain_tape_runs_and_its_steps_are_charged(client):
    client.open_job("vm-chain", {"vm_steps": 100_000})
    items = tapes.chains.random_items(random.Random(3), 4)
    out = client.call("sparkvm", {"tape": tapes.chain_tape(items)}, job="vm-chain")
    assert out["status"] == "halted"
    assert out["output"] == [it.value for it in items]
    assert all(t["ok"] for t in out["trace"] if t["op"] == "CHECK")
    assert spent(client, "vm-chain") == out["steps"]


def test_typed_errors_for_bad_tapes_and_a_missing_budget(client):
    with pytest.raises(errors.BadRequest) as info:
        client.call("sparkvm", {"tape": tapes.malformed_tape("unknown_opcode")}, budget={"vm_steps": 100})
    assert info.value.detail["kind"] == "unknown_opcode" and info.value.detail["pc"] == 1
    with pytest.raises(errors.BadRequest) as info:
        client.call("sparkvm", {"tape": tapes.malformed_tape("bad_target")}, budget={"vm_steps": 100})
    assert info.value.detail["kind"] == "malformed_tape"
    # Every job limits vm_steps (a compute kind: the default jobs too), so a request that asks for
    # no budget is granted what its job has left; a worker given no grant at all refuses to run.
    assert client.call("sparkvm", {"tape": ["HALT"]})["status"] == "halted"
    ctx = types.SimpleNamespace(granted={})
    with pytest.raises(errors.BadRequest) as info:
        SparkVM()._limits(ctx, {})
    assert info.value.detail["kind"] == "no_step_budget"


def test_an_infinite_loop_stops_at_its_grant_and_is_billed_exactly_that(client):
    client.open_job("vm-inf", {"vm_steps": 1_000_000})
    with pytest.raises(errors.BudgetExceeded) as info:
        client.call(
            "sparkvm",
            {"tape": tapes.hostile_tape("infinite", random.Random(0))},
            job="vm-inf",
            budget={"vm_steps": 5000},
        )
    assert info.value.detail["steps"] == 5000 and info.value.detail["fault"] == "step_budget"
    assert spent(client, "vm-inf") == 5000


def test_a_job_limit_on_vm_steps_exhausts_the_job(client):
    client.open_job("vm-limited", {"vm_steps": 3000})
    with pytest.raises(errors.BudgetExceeded):
        client.call("sparkvm", {"tape": tapes.hostile_tape("infinite", random.Random(0))}, job="vm-limited")
    assert spent(client, "vm-limited") == 3000
    with pytest.raises(errors.BudgetExceeded):  # the job takes no more work
        client.call("sparkvm", {"tape": ["HALT"]}, job="vm-limited")


def test_a_worker_that_ignores_its_grant_is_stopped_by_the_kernel(client):
    client.open_job("vm-kernel", {"vm_steps": 1_000_000})
    with pytest.raises(errors.BudgetExceeded):
        client.call(
            "sparkvmk",
            {"tape": tapes.hostile_tape("infinite", random.Random(0))},
            job="vm-kernel",
            budget={"vm_steps": 2000},
        )
    # The kernel charged the grant and not one step more, though the worker reported more.
    assert spent(client, "vm-kernel") == 2000
    out = client.call("sparkvmk", {"tape": tapes.loop_tape(10)}, job="vm-kernel", budget={"vm_steps": 2000})
    assert out["status"] == "halted" and out["output"] == [55]  # the worker serves on


@pytest.mark.parametrize("kind", ["recursion", "huge_alloc", "stack_bomb", "int_bomb"])
def test_hostile_tapes_are_stopped_and_billed(client, kind):
    job = f"vm-{kind}"
    client.open_job(job, {"vm_steps": 1_000_000})
    with pytest.raises(errors.RecaError) as info:
        client.call(
            "sparkvm", {"tape": tapes.hostile_tape(kind, random.Random(2))}, job=job, budget={"vm_steps": 100_000}
        )
    assert info.value.code == "tape_fault"
    steps = info.value.detail["steps"]
    assert 0 < steps <= 100_000 and spent(client, job) == steps


def test_svc_calls_another_service_through_the_bus(client):
    tape = [["SVC", "echo", {"x": 41}], ["FIELD", "x"], ["PUSH", 1], "ADD", "EMIT", "HALT"]
    out = client.call("sparkvm", {"tape": tape}, budget={"vm_steps": 1000})
    assert out["output"] == [42] and out["syscalls"] == 1
    with pytest.raises(errors.RecaError) as info:
        client.call("sparkvm", {"tape": [["SVC", "mmi.stats", {}], "HALT"]}, budget={"vm_steps": 1000})
    assert info.value.detail["fault"] == "service"


def test_stopped_tapes_are_in_the_log_and_the_log_replays(kern, client):
    client.open_job("vm-log", {"vm_steps": 50_000})
    with pytest.raises(errors.BudgetExceeded):
        client.call(
            "sparkvm",
            {"tape": tapes.hostile_tape("infinite", random.Random(0))},
            job="vm-log",
            budget={"vm_steps": 1234},
        )
    client.stats()  # management calls flush the decision log
    records = read_records(kern.decision_log)
    audits = [r for r in records if r.get("op") == "audit" and "tape_stopped" in json.dumps(r)]
    assert any('"max_steps": 1234' in json.dumps(r) or '"max_steps":1234' in json.dumps(r) for r in audits)
    charges = [r for r in records if r.get("op") == "charge" and "vm_steps" in json.dumps(r)]
    assert charges
    out = subprocess.run(
        [sys.executable, "-m", "kernel", "replay", kern.decision_log],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert " divergences 0" in out.stdout
