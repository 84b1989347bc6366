"""The ladder's policy through a real kernel (issue 23; kernel/ladder.py): the CPU trigger, the
workers a kill would hurt, and kept state that never dies silently.

* A worker that holds an answered request in a blocking wait (no CPU) is not frozen; being
  exclusive, it is killed for its slot when a burning one would be.
* A worker whose service keeps state and ignores its cancel while spinning is throttled --
  frozen, thawed, frozen again -- and killed only once the request burnt its CPU ceiling; all the
  CPU is billed to the request's job.
* decode (a real model): a beam past its budget is never frozen or killed within decode's
  declared grace, so a session kept on the worker survives (before: the worker was killed at
  1.1 s, and the session with it, "no decode 1 on this worker"); a beam over the worker's bounds
  is refused up front (``bad_request``, ``kind: limit``); and when the worker *is* killed past a
  ceiling, the kept session answers ``session_lost``, not "no decode".
"""

from __future__ import annotations

import json
import time

import pytest

from clients import Client
from kernel import errors
from kernel import protocol as P
from tests.support import KernelProcess, service_block

pytestmark = pytest.mark.system


def _records(path: str) -> list[dict]:
    """The decision log's records (through kernel.logstore where it reads them, else JSON lines)."""
    from kernel import logstore

    read = getattr(logstore, "read_records", None)
    if read is not None:
        return list(read(path))
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rungs(path: str) -> list[dict]:
    return [r for r in _records(path) if r.get("op") == "enforce"]


def _wait_rung(c: Client, k: KernelProcess, pred, what: str, bound: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        c.stats()  # flushes the decision log
        rungs = _rungs(k.decision_log)
        if any(pred(r) for r in rungs):
            return rungs
        time.sleep(0.1)
    pytest.fail(f"no {what} within {bound:g} s: {[r['in'] for r in _rungs(k.decision_log)]}")


def _call_restarted(c: Client, service: str, body: dict, bound: float = 60.0):
    """A call on a service whose worker was just killed: the old registration goes at its
    liveness, so a call may land on it and die; retried until the restarted worker answers."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return c.call(service, body)
        except (errors.WorkerDied, errors.Unavailable):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_worker_waiting_without_cpu_is_not_frozen_but_killed_for_its_slot():
    k = KernelProcess(service_block("hold", "tests.hold_service"), heartbeat=0.5, liveness=20)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("hold", 30)
            with pytest.raises(errors.BudgetExceeded):
                c.call("hold", {"sleep_ms": 6000}, budget={"wall_ms": 200})
            rungs = _wait_rung(c, k, lambda r: r["in"]["rung"] == "kill", "kill")
            kinds = [r["in"]["rung"] for r in rungs if r["in"]["rung"] != "bill"]
            assert kinds == ["kill"], kinds  # never frozen: it burnt nothing
            assert next(r for r in rungs if r["in"]["rung"] == "kill")["in"]["why"] == "idle"
            assert _call_restarted(c, "hold", {"spin_ms": 1}) == {"held_ms": 1}
    finally:
        k.stop()


def test_a_worker_that_keeps_state_is_throttled_and_killed_only_past_its_cpu_ceiling():
    svc = service_block("hold", "tests.hold_service") + "keeps_state = true\n"
    k = KernelProcess(svc + "\n[enforce]\nkill_grace_ms = 150.0\ncpu_ceiling_ms = 250.0\n", heartbeat=0.5, liveness=40)
    try:
        with Client(k.endpoint, timeout=60, retries=0) as c:
            c.wait_for_service("hold", 30)
            c.open_job("spin", {"wall_ms": 200})
            with pytest.raises(errors.BudgetExceeded):
                c.call("hold", {"spin_ms": 60_000}, job="spin")
            rungs = _wait_rung(c, k, lambda r: r["in"]["rung"] == "kill", "kill", bound=120)
            ladder = [
                (r["in"]["rung"], r["in"].get("why")) for r in rungs if r["in"]["rung"] in ("freeze", "thaw", "kill")
            ]
            assert ladder[-1] == ("kill", "cpu ceiling"), ladder
            assert ("kill", "answer window") not in ladder  # spared: not killed at its first answer window
            # throttled on the way: frozen again after an answer window it spent burning
            assert [rung for rung, _ in ladder].count("freeze") >= 2, ladder
            kill = next(r for r in rungs if r["in"]["rung"] == "kill")
            assert kill["in"]["burnt_ms"] >= 250.0
            billed = sum(r["out"]["cpu_ms"] for r in _rungs(k.decision_log) if r["in"]["rung"] == "bill")
            assert billed >= 250.0 - 1e-6  # all of it went to the job
            spent = c.mmi(P.MMI_JOB_STATS, {"job": "spin"})["spent"]
            assert spent["cpu_ms"] >= billed - 1e-6
            assert _call_restarted(c, "hold", {"spin_ms": 1}) == {"held_ms": 1}
    finally:
        k.stop()


PROMPT = "Q:1+2*3,4+5*6,7+8*9;"


def test_a_kept_decode_session_survives_another_requests_beam_past_its_budget():
    k = KernelProcess(service_block("decode", "services.decode"), heartbeat=0.5, liveness=20)
    try:
        with Client(k.endpoint, timeout=120, retries=0) as c:
            c.wait_for_service("decode", 90)
            kept = c.call("decode", {"op": "generate", "prompt": "Q:1+2*3,4+5*6;", "max_new": 4})
            # over the worker's bound: refused before any engine call, naming the bound
            with pytest.raises(errors.BadRequest) as info:
                c.call("decode", {"op": "generate", "prompt": PROMPT, "max_new": 150, "width": 24})
            assert info.value.detail["kind"] == "limit" and info.value.detail["limit"] == "max_beam_width"
            with pytest.raises(errors.BadRequest) as info:
                c.call("decode", {"op": "generate", "prompt": PROMPT, "max_new": 1000, "width": 16})
            assert info.value.detail["limit"] == "max_beam_tokens"
            # the widest beam allowed, with a budget it cannot meet: answered on time, and its worker
            # (kept state: spared; the beam within decode's declared grace of CPU) neither frozen nor killed
            with pytest.raises(errors.BudgetExceeded):
                c.call(
                    "decode", {"op": "generate", "prompt": PROMPT, "max_new": 256, "width": 16}, budget={"wall_ms": 30}
                )
            state = c.call("decode", {"op": "state", "decode": kept["decode"], "wait_paused_ms": 0})
            assert state["tokens"] == kept["tokens"]
            time.sleep(1.5)  # past where the ladder killed it before (1.1 s)
            state = c.call("decode", {"op": "state", "decode": kept["decode"]})
            assert state["tokens"] == kept["tokens"]
            c.stats()
        assert not [r for r in _rungs(k.decision_log) if r["in"]["rung"] in ("freeze", "kill")]
    finally:
        k.stop()


def test_a_kept_decode_session_killed_with_its_worker_answers_session_lost():
    # a worker allowed huge beams, a small CPU ceiling and no declared grace: the beam past its
    # budget gets the worker killed past the ceiling -- the kept session says so
    svc = service_block("decode", "services.decode", args=["--max-beam-width", "64", "--max-beam-tokens", "10000000"])
    k = KernelProcess(
        svc + "grace_ms = 0.0\n\n[enforce]\nkill_grace_ms = 100.0\ncpu_ceiling_ms = 100.0\n", heartbeat=0.5, liveness=40
    )
    try:
        with Client(k.endpoint, timeout=120, retries=0) as c:
            c.wait_for_service("decode", 90)
            kept = c.call("decode", {"op": "generate", "prompt": "Q:1+2*3,4+5*6;", "max_new": 4})
            with pytest.raises(errors.BudgetExceeded):
                c.call(
                    "decode", {"op": "generate", "prompt": PROMPT, "max_new": 2000, "width": 64}, budget={"wall_ms": 30}
                )
            rungs = _wait_rung(c, k, lambda r: r["in"]["rung"] == "kill", "kill", bound=120)
            assert [(r["in"]["why"]) for r in rungs if r["in"]["rung"] == "kill"] == ["cpu ceiling"]
            c.wait_for_service("decode", 90)
            with pytest.raises(errors.SessionLost) as info:
                _call_restarted(c, "decode", {"op": "state", "decode": kept["decode"]})
            assert info.value.detail["decode"] == kept["decode"]
            # a new session on the restarted worker works
            assert _call_restarted(c, "decode", {"op": "generate", "prompt": "Q:1+2;", "max_new": 2})["decode"]
    finally:
        k.stop()


def test_services_that_keep_state_for_other_principals_declare_it():
    from kernel.supervisor import ChildSpec, python_module_argv

    for module in ("services.decode", "services.sim", "services.kvtp", "services.ttc"):
        assert ChildSpec("s", python_module_argv(module)).keeps_state is True, module
    assert ChildSpec("s", python_module_argv("services.echo")).keeps_state is False
    assert ChildSpec("s", python_module_argv("services.ttc"), keeps_state=False).keeps_state is False


LONG = {"length": 256, "vars": 2, "seed": 5}


def test_a_long_decode_survives_its_worker_being_throttled_for_another_request():
    """decode's ``long_*`` decodes (kvtp's, kept with ``keep``) are state of their own principal on
    the worker: a beam of another request that ignores its budget gets the worker throttled --
    frozen, thawed for its answer window, frozen again -- never killed below its ceilings, and the
    long decode answers afterwards."""
    svc = service_block("decode", "services.decode", args=["--max-beam-width", "64", "--max-beam-tokens", "10000000"])
    svc += "grace_ms = 0.0\n" + service_block("kvtp", "services.kvtp")
    k = KernelProcess(
        svc + "\n[enforce]\nkill_grace_ms = 150.0\ncpu_ceiling_ms = 600000.0\nhold_ceiling_s = 600.0\n",
        heartbeat=0.5,
        liveness=40,
    )
    try:
        with Client(k.endpoint, timeout=300, retries=0) as c:
            for name in ("decode", "kvtp"):
                c.wait_for_service(name, 90)
            c.open_job("kept", {"kv_blocks": 8})
            run = c.call(
                "kvtp",
                {
                    "op": "run",
                    "varref": LONG,
                    "policy": {"name": "sparse", "topk": 2},
                    "tiers": {"device_blocks": 8, "host_blocks": 8, "disk_blocks": 16, "block_size": 32},
                    "queries": [],
                    "keep": True,
                },
                job="kept",
            )
            with pytest.raises(errors.BudgetExceeded):
                c.call(
                    "decode", {"op": "generate", "prompt": PROMPT, "max_new": 1500, "width": 64}, budget={"wall_ms": 30}
                )
            rungs = _wait_rung(
                c,
                k,
                lambda r: [x["in"]["rung"] for x in _rungs(k.decision_log)].count("freeze") >= 2,
                "a second freeze",
                bound=180,
            )
            ladder = [(r["in"]["rung"], r["in"].get("why")) for r in rungs if r["in"]["rung"] != "bill"]
            assert ("thaw", "answer window") in ladder and "kill" not in [rung for rung, _ in ladder], ladder
            stats = c.call("decode", {"op": "long_stats", "long": run["long"]}, job="kept")
            assert stats["tokens"] == run["tokens"] and stats["device_blocks"] == 8, stats
            c.call("decode", {"op": "long_free", "long": run["long"]}, job="kept")
            c.stats()
        assert not [r for r in _rungs(k.decision_log) if r["in"]["rung"] == "kill"]
    finally:
        k.stop()
