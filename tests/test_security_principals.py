"""Principals kept apart inside services (issue 24), one system test per stateful service.

One real ``python -m kernel`` over ``tcp://127.0.0.1`` with CURVE and principals from a key
directory (``alice`` and ``mallory`` as ``client``, ``op`` as operator); the services run on the
certificates the supervisor makes for them.  ``mallory`` names what ``alice`` holds; every answer
must be the one for an id that never existed, and alice's state must be untouched.
"""

from __future__ import annotations

import os
import shutil
import textwrap

import pytest
import zmq

from clients import Client
from kernel import errors, keys
from tests.support import KernelProcess, service_block, short_tmpdir

pytestmark = pytest.mark.system

SERVICES = ("decode", "rois", "ttc", "scch", "psccr", "bktrain")
BK_CONFIG = {
    "model": {"d_model": 32, "n_seq": 16, "n_layers": 3, "n_heads": 4, "n_experts": 2},
    "batch": 4,
    "eval_windows": 8,
}
BK = {"config": BK_CONFIG, "corpus_limit_bytes": 60_000}


@pytest.fixture(scope="module")
def kern():
    d = short_tmpdir()
    kd = os.path.join(d, "keys")
    for name, role in (("op", "operator"), ("alice", "client"), ("mallory", "client")):
        keys.new(kd, name, role)
    blocks = "".join(
        service_block(n, f"services.{n}", args=["--db", os.path.join(d, "ttc.db")] if n == "ttc" else ())
        for n in SERVICES
    )
    config = (
        textwrap.dedent(f"""
        [kernel]
        endpoint = "tcp://127.0.0.1:0"
        control = "tcp://127.0.0.1:0"
        heartbeat_s = 0.5
        liveness = 10
        unavailable_wait_s = 0.5
        [auth]
        keys = "{kd}"
        [limits]
        root = {{ wall_ms = 1e9, cpu_ms = 1e9, tokens = 1e9, flops = 1e15, vm_steps = 1e9, cpu_s = 1e6 }}
        default = {{ wall_ms = 1e8, cpu_ms = 1e8, tokens = 1e8, flops = 1e14, vm_steps = 1e8, cpu_s = 1e5 }}
    """)
        + blocks
    )
    k = KernelProcess.from_config(config)
    k.keys = kd
    try:
        with as_(k, "op") as c:
            for name in SERVICES:
                c.wait_for_service(name, 120)
        yield k
    finally:
        k.stop(timeout=120)  # six services stop together, each within its own shutdown bound
        shutil.rmtree(d, ignore_errors=True)


def as_(kern, name: str) -> Client:
    return Client(
        kern.endpoint,
        timeout=120,
        retries=0,
        context=zmq.Context.instance(),
        cert=os.path.join(kern.keys, f"{name}.key_secret"),
        server_cert=os.path.join(kern.keys, "kernel.key"),
    )


def _err(fn, *args, **kw) -> errors.RecaError:
    with pytest.raises(errors.RecaError) as info:
        fn(*args, **kw)
    e = info.value
    return e


def _same(a: errors.RecaError, b: errors.RecaError) -> None:
    """The same answer, but for what the kernel measured (the wall time it took)."""

    def strip(e):
        return {k: v for k, v in e.detail.items() if k != "spent"}

    assert (type(a), a.code, a.message, strip(a)) == (type(b), b.code, b.message, strip(b))


def test_decode_sessions_are_the_callers_own(kern):
    with as_(kern, "alice") as alice, as_(kern, "mallory") as mallory:
        gen = alice.call("decode", {"op": "generate", "prompt": "Q:1+2*3;", "max_new": 4})
        did = gen["decode"]
        seen = {
            op: _err(mallory.call, "decode", {"op": op, "decode": did, **extra})
            for op, extra in (
                ("state", {}),
                ("inject", {"text": "9"}),
                ("rewind", {"pos": 1}),
                ("free", {}),
                ("generate", {"max_new": 2}),
            )
        }
        assert did not in mallory.call("decode", {"op": "stats"})["decodes"]
        assert did in alice.call("decode", {"op": "stats"})["decodes"]
        # Through another service acting for mallory: the same answer (rois reads the decode for her).
        via_rois = _err(mallory.call, "rois", {"op": "verify", "decode": did})
        assert alice.call("decode", {"op": "state", "decode": did})["tokens"] == gen["tokens"]  # untouched
        assert "ok" in alice.call("rois", {"op": "verify", "decode": did})  # rois acts for alice: found
        alice.call("decode", {"op": "free", "decode": did})
        # Now the id never existed for anyone: every answer mallory got is exactly this one.
        for op, e in seen.items():
            extra = {"inject": {"text": "9"}, "rewind": {"pos": 1}, "generate": {"max_new": 2}}.get(op, {})
            _same(e, _err(alice.call, "decode", {"op": op, "decode": did, **extra}))
        _same(via_rois, _err(alice.call, "rois", {"op": "verify", "decode": did}))


def test_ttc_calls_consumers_and_idempotency_keys_are_the_callers_own(kern):
    with as_(kern, "alice") as alice, as_(kern, "mallory") as mallory:
        prep = alice.call(
            "ttc",
            {
                "op": "prepare",
                "tool": "sat",
                "inputs": {"n_vars": 20, "seed": 1},
                "est_cost": 1,
                "consumers": ["planner"],
                "idem": "k1",
            },
        )
        cid = prep["call_id"]
        never = "0123456789abcdef" if cid != "0123456789abcdef" else "fedcba9876543210"
        for op, extra in (
            ("status", {}),
            ("commit", {}),
            ("abort", {}),
            ("result", {}),
            ("attach", {"consumer": "planner"}),
            ("subscribe", {"consumer": "m"}),
        ):
            theirs = _err(mallory.call, "ttc", {"op": op, "call_id": cid, **extra})
            unknown = _err(mallory.call, "ttc", {"op": op, "call_id": never, **extra})
            assert theirs.code == unknown.code == "unknown_call"
            assert theirs.message == unknown.message.replace(never, cid)
        assert (
            mallory.call("ttc", {"op": "audit", "call_id": cid})
            == {"events": []}
            == mallory.call("ttc", {"op": "audit", "call_id": never})
        )
        # mallory's own names do not meet alice's: her idem key k1 makes a new call of her own.
        mine = mallory.call(
            "ttc",
            {
                "op": "prepare",
                "tool": "sat",
                "inputs": {"n_vars": 21, "seed": 2},
                "est_cost": 1,
                "consumers": ["planner"],
                "idem": "k1",
            },
        )
        assert mine["call_id"] != cid
        assert mallory.call("ttc", {"op": "withdraw", "consumer": "planner"})["aborted"] == [mine["call_id"]]
        assert alice.call("ttc", {"op": "status", "call_id": cid})["state"] == "PREPARED"  # untouched
        assert all(e.get("call_id") in (None, mine["call_id"]) for e in mallory.call("ttc", {"op": "audit"})["events"])
        alice.call("ttc", {"op": "abort", "call_id": cid})


def test_scch_serves_no_principal_what_another_put(kern):
    subgoal = {"kind": "solve", "expr": "p**2*x**2 = 4", "var": "x"}
    with as_(kern, "alice") as alice, as_(kern, "mallory") as mallory:
        assert alice.call("scch", {"op": "put", "subgoal": subgoal, "answer": ["2/p", "-2/p"]})["admitted"]
        assert alice.call("scch", {"op": "get", "subgoal": subgoal})["hit"]
        assert not mallory.call("scch", {"op": "get", "subgoal": subgoal})["hit"]
        assert mallory.call("scch", {"op": "stats"})["hits"] == 0


def test_psccr_grafts_only_its_own_principals_checkpoints(kern):
    steps = [{"op": "diff"}, {"op": "expand"}, {"op": "integrate"}]
    with as_(kern, "alice") as alice, as_(kern, "mallory") as mallory:
        first = alice.call("psccr", {"op": "derive", "start": "x*exp(x)", "var": "x", "steps": steps})
        assert first["ok"] and alice.call("psccr", {"op": "stats"})["continuations"] >= 1
        assert mallory.call("psccr", {"op": "stats"})["continuations"] == 0
        theirs = mallory.call("psccr", {"op": "derive", "start": "z*exp(z)", "var": "z", "steps": steps})
        assert theirs["ok"] and theirs["grafted"] == 0 and theirs["computed"] >= len(steps)
        again = alice.call("psccr", {"op": "derive", "start": "z*exp(z)", "var": "z", "steps": steps})
        assert again["grafted"] == len(steps)


def test_bktrain_runs_are_named_within_their_principal(kern):
    with as_(kern, "alice") as alice, as_(kern, "mallory") as mallory:
        a = alice.call("bktrain", BK | {"run": "shared-name", "steps": 2})
        assert a["resumed_from"] == 0 and a["steps_done"] == 2
        m = mallory.call("bktrain", BK | {"run": "shared-name", "steps": 3})
        assert m["resumed_from"] == 0 and m["steps_done"] == 3  # her own run, from scratch
        a2 = alice.call("bktrain", BK | {"run": "shared-name", "steps": 3})
        assert a2["resumed_from"] == 2  # alice's run was neither read nor trained by mallory
        assert os.path.dirname(a2["checkpoint"]) != os.path.dirname(m["checkpoint"])
