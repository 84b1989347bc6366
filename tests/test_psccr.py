"""PSC-CR: unit tests of :func:`services.psccr.logic.derive` and a system test through the kernel
(heavy steps as budgeted calls to ``scch``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
import sympy as sp
import zmq

from clients import Client
from kernel import errors
from kernel import protocol as P
from services.psccr.logic import Checkpoints, compute_local, derive
from tests.support import KernelProcess, service_block

STEPS = [{"op": "diff"}, {"op": "expand"}, {"op": "integrate"}, {"op": "subs", "arg": "2*x + 1"},
         {"op": "expand"}, {"op": "simplify"}] * 2


async def local(op, expr, var, arg):
    t0 = time.process_time()
    out = compute_local(op, expr, var, arg)
    return out, time.process_time() - t0


def run(*args, **kw):
    return asyncio.run(derive(*args, compute=local, **kw))


def test_failure_restarts_from_the_last_checkpoint_not_the_start():
    clean = run("a*x**2*sin(x)", "x", STEPS, store=None, mode="scratch")
    ckpt = run("a*x**2*sin(x)", "x", STEPS, store=Checkpoints(), faults={9})
    scratch = run("a*x**2*sin(x)", "x", STEPS, store=None, faults={9}, mode="scratch")
    assert ckpt.ok and scratch.ok and ckpt.failures == scratch.failures == 1
    x, a = sp.symbols("x a")
    assert sp.simplify(sp.sympify(ckpt.final, locals={"a": a}) - sp.sympify(clean.final, locals={"a": a})) == 0
    assert scratch.redone == 10 and ckpt.redone == 1  # steps 0..9 again, against the failed step only


def test_cousin_branch_grafts_the_verified_continuation():
    store = Checkpoints()
    first = run("a*x**2*sin(x)", "x", STEPS, store=store)
    steps_t = [dict(s, arg=s["arg"].replace("x", "t")) if "arg" in s else s for s in STEPS]
    cousin = run("sin(t)*k*t**2", "t", steps_t, store=store)
    assert cousin.ok and cousin.grafted == len(STEPS) and cousin.computed == 0
    t, k = sp.symbols("t k")
    assert sp.sympify(cousin.final, locals={"k": k}) == sp.sympify(first.final).subs({sp.Symbol("a"): k, sp.Symbol("x"): t})


def test_a_wrong_graft_is_not_used():
    store = Checkpoints()
    run("x**3", "x", [{"op": "diff"}], store=store)
    # tamper every stored continuation: the cheap re-check refuses it and the step is computed
    store.db.execute("UPDATE edges SET result = 'c0**5'")
    out = run("y**3", "y", [{"op": "diff"}], store=store)
    assert out.grafted == 0 and out.computed == 1 and sp.sympify(out.final) == 3 * sp.Symbol("y") ** 2


@contextlib.contextmanager
def kernel_with(*names: str):
    """A kernel running ``services.<name>`` for each name, and a client once all registered."""
    k = KernelProcess("".join(service_block(n, f"services.{n}") for n in names), heartbeat=0.2, liveness=10)
    try:
        with Client(k.endpoint, timeout=60, retries=0, context=zmq.Context.instance()) as c:
            for name in names:
                c.wait_for_service(name, 60)
            yield c
    finally:
        k.stop()


@pytest.mark.system
def test_derivation_through_the_kernel():
    with kernel_with("scch", "psccr") as c:
        job = f"t-{uuid.uuid4().hex[:8]}"
        c.open_job(job, {})
        out = c.call("psccr", {"op": "derive", "start": "x*exp(x)", "var": "x", "steps": STEPS[:6],
                               "faults": [2]}, job=job)
        assert out["ok"] and out["failures"] == 1 and out["redone"] == 1
        spent = c.call(P.MMI_JOB_STATS, {"job": job})["spent"]
        assert spent["solver_calls"] == 3  # integrate twice (one wrong), simplify once: budgeted calls
        again = c.call("psccr", {"op": "derive", "start": "exp(z)*z", "var": "z",
                                 "steps": [dict(s, arg=s["arg"].replace("x", "z")) if "arg" in s else s
                                           for s in STEPS[:6]]}, job=job)
        assert again["grafted"] == 6 and again["computed"] == 0
        with pytest.raises(errors.BadRequest):
            c.call("psccr", {"op": "derive", "start": "x", "steps": [{"op": "rm -rf"}]})


@pytest.mark.system
def test_rois_with_grafts_through_the_decode_worker():
    """A verified item is checkpointed; a later question with the same item (product operands
    swapped) whose step is corrupted gets the verified continuation grafted, not re-decoded."""
    with kernel_with("decode", "psccr") as c:
        first = c.call("decode", {"op": "generate", "prompt": "Q:23+4*8,7+3*9;", "max_new": 40})
        rep = c.call("psccr", {"op": "repair", "decode": first["decode"]})
        assert rep["ok"] and rep["checkpointed"] >= 1
        second = c.call("decode", {"op": "generate", "prompt": "Q:5+6*7,7+9*3;", "max_new": 40})
        text = second["text"]
        pos = text.index("9*3=") + len("9*3=")  # corrupt the product of the known item
        wrong = str((int(text[pos]) + 1) % 10)
        c.call("decode", {"op": "replace", "decode": second["decode"], "start": pos + 1, "end": pos + 2,
                          "text": wrong})
        fixed = c.call("psccr", {"op": "repair", "decode": second["decode"]})
        assert fixed["ok"] and fixed["grafts"] == 1 and fixed["decoded"] == 0
        state = c.call("decode", {"op": "state", "decode": second["decode"]})
        assert "9*3=27;7+27=34;" in state["text"]
