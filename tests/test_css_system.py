"""System tests of ``css`` through a real ``python -m kernel``: every constraint satisfied by real
shallow-water runs funded through the job's budget in the kernel, a budget that runs out, typed
errors before any compute, and the rounds in the kernel's decision log."""

from __future__ import annotations

import json

import pytest

from kernel import errors
from tests.support import service_block, client_fixture, kernel_fixture
from kernel.logstore import read_records

pytestmark = pytest.mark.system

START = {"cells": 6, "dt_factor": 1.9, "order": 1}


kern = kernel_fixture(service_block("css", "services.css"), heartbeat=0.2, liveness=5)
client = client_fixture("css")


def spent(c, job):
    return c.call("mmi.job.stats", {"job": job})["spent"].get("cell_updates", 0.0)


def test_all_constraints_satisfied_and_paid_through_the_kernel(client, kern):
    client.open_job("css-ok", {"cell_updates": 2e6})
    partials = []
    out = client.call("css", {"start": START, "tolerance_m": 3e-4}, job="css-ok",
                      on_partial=lambda r: partials.append(r.payload))
    assert out["satisfied"] and out["stopped"] == "satisfied"
    assert all(v >= 0 for v in out["slacks"].values())
    assert out["state"]["dt_factor"] < 1.0 and out["state"]["order"] == 2  # CFL and accuracy needed work
    assert len(partials) == len(out["rounds"]) and partials[0]["before"]["units"] == -1.0
    # the kernel charged the job exactly the cell updates that ran (not the prediction)
    assert spent(client, "css-ok") == out["compute"] == out["charged"]
    audited = [r for r in read_records(kern.decision_log) if '"css"' in json.dumps(r, default=str)]
    assert [r["in"]["event"]["round"] for r in audited if r["op"] == "audit"][-len(out["rounds"]):] == \
        list(range(len(out["rounds"])))


def test_a_spent_budget_stops_the_funding(client):
    client.open_job("css-small", {"cell_updates": 30_000})
    out = client.call("css", {"start": START, "tolerance_m": 3e-4, "policy": "round_robin"}, job="css-small")
    assert not out["satisfied"] and out["stopped"] == "budget_spent"
    assert spent(client, "css-small") <= 30_000


def test_bad_constraints_are_refused_before_any_compute(client):
    client.open_job("css-bad", {"cell_updates": 1e6})
    bad = [
        {"constraints": [{"name": "cfl", "quantity": "courant", "limit": "0.45 m"}]},
        {"constraints": [{"name": "acc", "quantity": "depth_error", "limit": "1 s"}]},
        {"start": {"cells": 500}},
        {"start": {**START, "cells": 5}},  # odd: the grid needs an even count per block side
        {"start": {**START, "cells": 2}},
        {"start": {**START, "derivation": {"steps": [["dt", "dx / u"]], "inputs": {"dx": "1 m", "u": "1 m/s"},
                                           "expect": "[nonsense]"}}},
        {"policy": "magic"},
        {"actions": ["refine"]},
    ]
    for payload in bad:
        with pytest.raises(errors.BadRequest):
            client.call("css", payload, job="css-bad")
    assert spent(client, "css-bad") == 0.0
