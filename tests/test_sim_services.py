"""The simulation worker, IGMS and CS-WIF as services under a real ``python -m kernel``.

One kernel (sim, igms, cswif) for the module.  Covered: the IGMS loop with refinements counted by
the kernel's gate and stopped by the job's ``refinements`` budget; preempt/resume of a sim run at
a step boundary giving a bit-identical result; an unstable run stopped and reported; fidelity
orders to the worker holding a run (request path, and the ``ctl/sim/fidelity`` hook in-process);
typed errors for bad input with the worker still serving; the what-if gate refusing an escalation
that gains nothing and approving (and running) one that gains.
"""

from __future__ import annotations

import pytest

from clients import Client
from clients.core import raise_for
from kernel import errors
from kernel import protocol as P
from services.igms.logic import PrefetchedGate, order_from_actions, parse_request, report_from_wire, wanted_refinements
from services.sim.logic import RunState, cache_key, parse_order, parse_run, report_to_wire
from services.sim.service import SimService
from sims import cases
from sims.igms import IGMSController, LocalGate, Refine, SetDtFactor, run_controlled
from tests.support import service_block, client_fixture, kernel_fixture

pytestmark = pytest.mark.system

DAM = {"case": "radial_dam_break", "blocks": 4, "cells": 8, "t_end": 0.5}


kern = kernel_fixture(service_block("sim", "services.sim") + service_block("igms", "services.igms")
                      + service_block("cswif", "services.cswif"), heartbeat=0.2, liveness=10)
client = client_fixture("sim", "igms", "cswif", timeout=30, wait_s=20)


def child_pids(c: Client) -> dict[str, int]:
    return {ch["name"]: ch["pid"] for ch in c.stats()["children"]}


# -- IGMS loop -------------------------------------------------------------------------------------

def test_igms_refines_through_the_kernel_gate_until_the_job_budget_is_spent(client):
    client.open_job("igms-free", {})
    free = client.call("igms", DAM | {"refine_tol": 1e-3}, job="igms-free")
    assert free["status"] == "finished"
    granted_free = free["igms"]["refinements_granted"]
    assert granted_free > 5 and free["refined"] == granted_free  # enough demand to hit a cap of 5
    # The same controller offline (LocalGate, no cap) makes the same decisions: lockstep is exact.
    sim = cases.build("radial_dam_break", blocks=4, cells=8, max_level=1, t_end=0.5, indicators=("entropy",))
    offline = IGMSController(parse_request(DAM | {"refine_tol": 1e-3})[0], LocalGate())
    run_controlled(sim, offline)
    assert offline.gate.used["refinements"] == granted_free
    assert [int(v) for v in sim.topo.levels] == free["levels"]

    client.open_job("igms-capped", {"refinements": 5})
    capped = client.call("igms", DAM | {"refine_tol": 1e-3}, job="igms-capped")
    stats = client.call("mmi.job.stats", {"job": "igms-capped"})
    assert capped["igms"]["refinements_granted"] == capped["refined"] == 5
    assert stats["spent"]["refinements"] == 5 and stats["remaining"]["refinements"] == 0
    assert capped["igms"]["kernel_refusals"] > 0 and capped["igms"]["refinements_refused"] > 0
    assert capped["status"] == "finished"  # out of refinements is not out of compute: the run goes on
    assert stats["spent"]["flops"] == capped["total_cell_updates"]
    assert capped["total_cell_updates"] < free["total_cell_updates"]
    assert capped["mass_rel_drift"] <= 1e-11


def test_igms_rejects_bad_settings_and_passes_on_sim_errors(client):
    with pytest.raises(errors.BadRequest, match="refine_tol"):
        client.call("igms", DAM | {"refine_tol": -1.0})
    with pytest.raises(errors.BadRequest, match="unknown keys"):
        client.call("igms", DAM | {"turbo": True})
    with pytest.raises(errors.BadRequest, match="unknown case"):
        client.call("igms", DAM | {"case": "volcano"})


# -- the simulation worker -------------------------------------------------------------------------

def test_preempt_resume_at_a_step_boundary_is_bit_identical(kern, client):
    # the order must reach the worker before the run ends: it is sent at the first step's report;
    # on a busy machine a short run can end before the order arrives (the kernel then answers the
    # preempt not_found), so the run is made 4x longer and tried again, never assumed fast enough
    for attempt, t_end in enumerate((2.0, 8.0, 32.0)):
        run = DAM | {"t_end": t_end}
        reference = client.call("sim", run)
        job = f"pre{attempt}"
        client.open_job(job, {})
        steps, statuses, flops_at_pause, missed = [], [], [], []
        with Client(kern.endpoint, timeout=10, retries=0) as ctl:
            def on_partial(r):
                statuses.append(r.status)
                if r.status == P.STATUS_PAUSED:
                    flops_at_pause.append(ctl.call("mmi.job.stats", {"job": job})["spent"]["flops"])
                    ctl.call("mmi.resume", {"job": job, "service": "sim"})
                if r.status != P.STATUS_PARTIAL:
                    return  # paused / resumed acknowledgements
                steps.append(r.payload)
                if r.payload["step"] == 1:
                    try:
                        ctl.call("mmi.preempt", {"job": job, "service": "sim"})
                    except errors.NotFound:
                        missed.append(t_end)  # the run ended before the order reached the kernel

            resumed = client.call("sim", run, job=job, on_partial=on_partial)
        if not missed:
            break
    assert not missed, f"every run ended before its preempt arrived: {missed}"
    assert statuses.count(P.STATUS_PAUSED) == 1
    paused_after = statuses.index(P.STATUS_PAUSED)  # number of step reports before the pause
    # paused between two whole steps: everything charged so far is exactly the steps reported
    assert flops_at_pause[0] == sum(s["cell_updates"] for s in steps[:paused_after])
    assert [s["step"] for s in steps] == list(range(1, reference["steps"] + 1))
    assert resumed["digest"] == reference["digest"] and resumed["steps"] == reference["steps"]
    assert client.call("mmi.job.stats", {"job": job})["spent"]["flops"] == resumed["total_cell_updates"]


def test_unstable_run_is_stopped_and_reported(client):
    client.open_job("boom", {"flops": 10**9})
    last = []
    out = client.call("sim", {"case": "radial_dam_break", "blocks": 2, "cells": 8, "dt_factor": 8.0},
                      job="boom", on_partial=lambda r: last.append(r.payload))
    assert out["status"] == "unstable" and "halted at step" in out["reason"]
    assert out["time"] < out["t_end"] and out["steps"] == last[-1]["step"] < 10
    assert last[-1]["status"] == "unstable" and last[-1]["breaches"]
    assert client.call("mmi.job.stats", {"job": "boom"})["spent"]["flops"] == out["total_cell_updates"]


def test_controlled_run_follows_fidelity_orders_sent_to_its_worker(kern, client):
    seen, errors_seen = [], []
    with Client(kern.endpoint, timeout=10, retries=0) as ctl:
        def drive(r):
            w = r.payload
            seen.append(w["step"])
            if w["step"] == 1:
                with pytest.raises(errors.BadRequest, match="block ids"):
                    ctl.call(w["control"], {"op": "fidelity", "run": w["run"], "refine": [999]})
                errors_seen.append("bad ids")
                order = {"op": "fidelity", "run": w["run"], "step": 1, "refine": [0, 5], "dt_factor": 0.5}
            elif w["status"] == "ok":
                order = {"op": "fidelity", "run": w["run"], "step": w["step"]}
            else:
                return  # the last step: the run is over, it waits for nothing
            assert ctl.call(w["control"], order) == {"queued": True, "run": w["run"]}

        out = client.call("sim", DAM | {"controlled": True, "run": "ctl-run"}, on_partial=drive)
    assert errors_seen == ["bad ids"] and seen == list(range(1, out["steps"] + 1))
    assert out["levels"][0] == out["levels"][5] == 1 and sum(out["levels"]) == 2
    assert out["dt_factor"] == 0.5 and out["orders_applied"] == out["steps"] - 1
    assert client.call("sim", {"op": "status", "run": "ctl-run"})["digest"] == out["digest"]


def test_controlled_run_without_a_controller_times_out(client):
    with pytest.raises(errors.Timeout, match="no fidelity order for step 1"):
        client.call("sim", DAM | {"controlled": True, "order_timeout_s": 0.3})


@pytest.mark.parametrize("payload,exc,match", [
    ({"case": "volcano"}, errors.BadRequest, "unknown case"),
    ({"case": "radial_dam_break", "params": {"h_in": -1.0}}, errors.BadRequest, "positive"),
    ({"case": "radial_dam_break", "params": {"h_in": float("nan")}}, errors.BadRequest, "finite"),
    ({"case": "lake_at_rest", "cells": 0}, errors.BadRequest, "cells"),
    ({"case": "lake_at_rest", "blocks": 64, "cells": 64}, errors.BadRequest, "too large"),
    ({"case": "lake_at_rest", "dt_factor": float("inf")}, errors.BadRequest, "finite"),
    ({"case": "lake_at_rest", "indicators": ["vorticity"]}, errors.BadRequest, "indicators"),
    ({"case": "lake_at_rest", "colour": "blue"}, errors.BadRequest, "unknown keys"),
    ({"op": "fidelity", "run": "no-such-run", "refine": [1]}, errors.Refused, "unknown run"),
    ({"op": "status", "run": "no-such-run"}, errors.Refused, "unknown run"),
    ({"op": "teleport"}, errors.BadRequest, "unknown op"),
    ([1, 2, 3], errors.BadRequest, "unknown op"),
])
def test_bad_input_gives_typed_errors_and_the_worker_keeps_serving(client, payload, exc, match):
    before = child_pids(client)
    with pytest.raises(exc, match=match):
        client.call("sim", payload)
    assert client.call("sim", {"case": "lake_at_rest", "blocks": 1, "cells": 4, "t_end": 0.01})["status"] == "finished"
    assert child_pids(client) == before


# -- CS-WIF ----------------------------------------------------------------------------------------

def _esc(run_id: str, case: str, params: dict) -> dict:
    return {"run_id": run_id, "case": case, "params": params, "blocks": 4, "cells": 8, "from_level": 1, "to_level": 2}


def test_whatif_refuses_a_useless_escalation_and_approves_a_gainful_one(client):
    client.open_job("wif", {"escalations": 1})
    with pytest.raises(errors.Refused) as info:
        client.call("cswif", {"escalation": _esc("lake", "lake_at_rest", {})}, job="wif")
    refused = info.value.detail["decision"]
    assert refused["approved"] is False and refused["prediction"]["gain"] == 0.0
    spent = client.call("mmi.job.stats", {"job": "wif"})["spent"]
    assert spent["flops"] == refused["prediction"]["surrogate_cost"] > 0 and "escalations" not in spent

    gauss = _esc("gauss", "gaussian_diffusion", {"sigma": 0.1, "t_end": 0.002})
    ok = client.call("cswif", {"escalation": gauss, "execute": True}, job="wif")
    assert ok["approved"] and ok["prediction"]["roi_per_m"] >= ok["threshold"]
    assert ok["run"]["status"] == "finished" and set(ok["run"]["levels"]) == {2}
    spent = client.call("mmi.job.stats", {"job": "wif"})["spent"]
    assert spent["escalations"] == 1
    # approved by the what-if gate, but the job's escalation budget is spent: the kernel refuses
    with pytest.raises(errors.Refused, match="escalations"):
        client.call("cswif", {"escalation": gauss | {"run_id": "gauss-again"}}, job="wif")

    assert client.call("cswif", {"op": "outcome", "run_id": "gauss", "realized_gain": 0.0018,
                                 "realized_cost": 7.4e5}) == {"run_id": "gauss", "would_have_approved": True,
                                                              "approved": True}
    ledger = client.call("cswif", {"op": "ledger"})
    rows = {r["run_id"]: r for r in ledger["decisions"]}
    assert {"lake", "gauss"} <= set(rows) and rows["gauss"]["outcome"]["gain"] == 0.0018
    assert ledger["accuracy"]["wrong"] == 0 and ledger["accuracy"]["decided"] >= 1


@pytest.mark.parametrize("payload,exc,match", [
    ({"escalation": _esc("x", "volcano", {})}, errors.BadRequest, "unknown case"),
    ({"escalation": _esc("x", "lake_at_rest", {"depth": -2.0})}, errors.BadRequest, "positive"),
    ({"escalation": _esc("x", "lake_at_rest", {}) | {"to_level": 1}}, errors.BadRequest, "from_level"),
    ({"escalation": {"run_id": "x"}}, errors.BadRequest, "missing"),
    ({"op": "outcome", "run_id": "never-decided", "realized_gain": 0.1, "realized_cost": 1.0},
     errors.Refused, "unknown escalation"),
    ({"op": "outcome", "run_id": "lake", "realized_gain": -1, "realized_cost": 1.0}, errors.BadRequest, ">= 0"),
])
def test_whatif_bad_input_gives_typed_errors(client, payload, exc, match):
    before = child_pids(client)
    with pytest.raises(exc, match=match):
        client.call("cswif", payload)
    assert child_pids(client) == before


# -- the result cache --------------------------------------------------------------------------------

GAUSS = {"case": "gaussian_diffusion", "params": {"sigma": 0.17, "D": 0.9}, "blocks": 2, "cells": 8, "level": 1,
         "max_level": 1}


def test_result_cache_never_runs_the_same_request_twice_and_never_serves_another_parameter_set(client):
    client.open_job("simcache", {})
    stats0 = client.call("sim", {"op": "status"})["cache"]
    flops0 = client.call("mmi.job.stats", {"job": "simcache"})["spent"].get("flops", 0.0)
    first = client.call("sim", GAUSS | {"cache": True}, job="simcache")
    flops1 = client.call("mmi.job.stats", {"job": "simcache"})["spent"].get("flops", 0.0)
    assert first["status"] == "finished" and not first.get("cached") and flops1 > flops0
    # the same request, written differently (key order, defaults spelled out, report_every): a hit
    again = client.call("sim", {"report_every": 7, "cache": True, "max_level": 1, "level": 1, "cells": 8, "blocks": 2,
                                "params": {"D": 0.9, "sigma": 0.17, "amplitude": 1.0}, "case": "gaussian_diffusion"},
                        job="simcache")
    assert again["cached"] and again["cached_from"] == first["run"] and again["run"] != first["run"]
    assert again["digest"] == first["digest"] and again["total_cell_updates"] == first["total_cell_updates"]
    assert client.call("mmi.job.stats", {"job": "simcache"})["spent"].get("flops", 0.0) == flops1  # nothing ran
    # one parameter changed: computed, a different state
    other = client.call("sim", GAUSS | {"cache": True, "params": {"sigma": 0.17, "D": 0.91}}, job="simcache")
    assert not other.get("cached") and other["digest"] != first["digest"]
    # without cache: true the request runs again (the default: benchmarks that measure runs)
    plain = client.call("sim", GAUSS, job="simcache")
    assert not plain.get("cached") and plain["digest"] == first["digest"]
    stats = client.call("sim", {"op": "status"})["cache"]
    assert stats["hits"] - stats0["hits"] == 1 and stats["stored"] - stats0["stored"] == 2


def test_cache_key_is_the_canonical_request():
    def key(payload, run_id="r"):
        spec, sim = parse_run(payload, run_id)
        return cache_key(payload, spec, sim)

    k = key(GAUSS | {"cache": True})
    assert k == key({**GAUSS, "cache": True, "report_every": 3, "order_timeout_s": 5.0}, "other-id")
    assert k == key(GAUSS | {"cache": True, "level": None, "levels": [1, 1, 1, 1]})
    assert k == key(GAUSS | {"cache": True, "params": {"sigma": 0.17, "D": 0.9, "x0": 0.0}})
    for changed in ({"params": {"sigma": 0.17, "D": 0.9000001}}, {"level": 0}, {"max_level": 2}, {"cells": 10},
                    {"t_end": 0.019}, {"dt_factor": 0.5}, {"max_steps": 5}, {"indicators": ["truncation"]},
                    {"case": "cosine_diffusion", "params": {"D": 0.9}}):
        assert key(GAUSS | {"cache": True} | changed) != k, changed
    assert key(GAUSS) is None  # not asked for
    assert key(GAUSS | {"cache": True, "controlled": True}) is None  # steered by orders
    assert key(GAUSS | {"cache": True, "run": "mine"}) is None  # named: may be steered
    with pytest.raises(errors.BadRequest, match="cache"):
        parse_run(GAUSS | {"cache": "yes"}, "r")


# -- pure parts (no sockets) -----------------------------------------------------------------------

def test_fidelity_control_topic_is_applied_at_the_next_step_boundary():
    svc = SimService()
    spec, sim = parse_run({"case": "gaussian_diffusion", "blocks": 2, "cells": 8}, "r1")
    state = svc.runs["r1"] = RunState(spec, sim)
    svc.on_control("preempt", {"job": "x"})  # not a fidelity op: ignored
    svc.on_control("fidelity", {"run": "elsewhere", "refine": [0]})  # held by another worker
    svc.on_control("fidelity", {"run": "r1", "refine": [7]})  # malformed: block 7 of 4
    assert svc.rejected_controls == 1 and state.pending == []
    svc.on_control("fidelity", {"run": "r1", "refine": [1, 2], "dt_factor": 0.25})
    assert list(sim.topo.levels) == [0, 0, 0, 0]  # nothing happens between steps
    state.apply_pending()
    assert list(sim.topo.levels) == [0, 1, 1, 0] and sim.dt_factor == 0.25 and state.refined == 2


def test_prefetched_gate_grants_a_prefix_and_never_gives_back():
    gate = PrefetchedGate("refinements", 2)
    assert [gate.reserve("refinements", 1) for _ in range(3)] == [True, True, False]
    assert not gate.reserve("prototypes", 1) and gate.used == 2 and gate.refused == 2
    gate.release("refinements", 2)
    assert gate.used == 2 and gate.released == 2
    with pytest.raises(ValueError):
        PrefetchedGate("refinements", -1)


def test_wire_report_round_trip_drives_the_controller_identically():
    sim = cases.build("radial_dam_break", blocks=4, cells=8, max_level=1, indicators=("entropy",))
    report = sim.step()
    back = report_from_wire(report_to_wire("r", "sim@1", report))
    cfg = parse_request(DAM)[0]
    a = IGMSController(cfg, LocalGate()).decide(report, 0.0)
    b = IGMSController(cfg, LocalGate()).decide(back, 0.0)
    assert a == b and any(isinstance(x, Refine) for x in a)
    assert wanted_refinements(back, cfg) == len(next(x for x in a if isinstance(x, Refine)).block_ids)
    order = order_from_actions("r", 1, [SetDtFactor(0.5, "cfl"), *a])
    assert order["dt_factor"] == 0.5 and order["refine"] == sorted(a[0].block_ids)
    with pytest.raises(errors.BadRequest, match="malformed step report"):
        report_from_wire({"step": 1})
    with pytest.raises(errors.BadRequest, match="dt_factor"):
        parse_order({"run": "r", "dt_factor": 9.0}, {"r": 16})


def test_a_cache_waiter_with_a_spent_budget_ends_at_a_safe_point_not_by_killing_the_worker(kern, client):
    """Regression (review): a request waiting for the identical cached run in flight reached no
    safe point; its budget ran out, the ladder froze and killed the whole sim worker, and every
    other run on it (another principal's too) died with ``worker_died``."""
    import threading

    import zmq

    long_run = {"case": "gaussian_diffusion", "blocks": 4, "cells": 64, "max_level": 0, "max_steps": 3000,
                "t_end": 1e6, "report_every": 100, "cache": True}
    pid = child_pids(client)["sim"]
    got = {}
    running = threading.Event()

    def first():
        with Client(kern.endpoint, timeout=120, retries=0, context=zmq.Context.instance()) as c:
            for reply in c.stream("sim", long_run):
                running.set()  # its first report: the run is in flight
                if reply.final:
                    got["first"] = raise_for(reply)

    t = threading.Thread(target=first)
    t.start()
    try:
        # the first is running (a fixed 1 s sleep before: were it not yet, the test was only weaker)
        assert running.wait(60), "the first run reported nothing within 60 s"
        with pytest.raises(errors.BudgetExceeded):
            client.call("sim", long_run, budget={"wall_ms": 300})
    finally:
        t.join(150)
    assert got["first"]["status"] == "max_steps"  # not worker_died: the worker was never killed
    assert child_pids(client)["sim"] == pid
