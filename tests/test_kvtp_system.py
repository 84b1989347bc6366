"""Tiered long-context decoding and precision orders through a real ``python -m kernel``: the
arena held as ``kv_blocks`` through the gate, answers equal to the in-process decoder, typed
refusals, POPB orders on ``ctl/decode/precision``."""

from __future__ import annotations

import random
import time
import uuid

import pytest
import torch
import zmq

from clients import Client
from kernel import errors
from lm import popb, varref
from lm.kvpolicy import BlockSparse
from lm.longdecode import LongDecoder, TierSpec, answer_tokens
from lm.longmodel import load
from tests.support import KernelProcess, service_block

pytestmark = pytest.mark.system
WAIT = 60.0
CONTEXT = {"length": 1024, "vars": 4, "seed": 3}
TIERS = {"device_blocks": 16, "host_blocks": 8, "disk_blocks": 40, "block_size": 32}
POLICY = {"name": "sparse", "topk": 4}


@pytest.fixture(scope="module")
def kern():
    services = "".join(service_block(n, f"services.{n}") for n in ("decode", "kvtp", "popb"))
    k = KernelProcess(services, heartbeat=0.2, liveness=10)
    try:
        with Client(k.endpoint, timeout=10, retries=0, context=zmq.Context.instance()) as c:
            for name in ("decode", "kvtp", "popb"):
                c.wait_for_service(name, WAIT)
        yield k
    finally:
        k.stop()


@pytest.fixture
def client(kern):
    c = Client(kern.endpoint, timeout=60, retries=0, context=zmq.Context.instance())
    yield c
    c.close()


def new_job(c: Client, budget: dict) -> str:
    job = f"kv-{uuid.uuid4().hex[:8]}"
    c.open_job(job, budget)
    return job


def test_kvtp_run_holds_kv_blocks_and_answers_like_the_local_decoder(client):
    ctx = varref.make_context(random.Random(CONTEXT["seed"]), CONTEXT["length"], CONTEXT["vars"])
    queries = list(ctx.values)
    torch.set_num_threads(1)
    with LongDecoder(load(), BlockSparse(topk=4), TierSpec(16, 8, 40, 32)) as local:
        local.prefill(ctx.tokens)
        expected = [varref.decode(answer_tokens(local, ctx.query(q))[-varref.ANSWER_LEN:]) for q in queries]
    job = new_job(client, {"kv_blocks": 16})
    partials = []
    out = client.call("kvtp", {"op": "run", "varref": CONTEXT, "policy": POLICY, "tiers": TIERS,
                               "queries": queries}, job=job, on_partial=partials.append)
    assert [a["answer"] for a in out["answers"]] == expected
    assert out["misses"] > 0 and out["device_blocks"] == 16
    assert any(isinstance(p.payload, dict) and p.payload.get("opened") for p in partials)
    # the arena was given back: the whole budget can be held again at once
    again = client.call("mmi.gate.reserve", {"job": job, "resource": "kv_blocks", "amount": 16})
    client.call("mmi.gate.release", {"reservation": again["reservation"]})


def test_an_arena_over_the_jobs_kv_blocks_is_refused(client):
    job = new_job(client, {"kv_blocks": 8})
    with pytest.raises(errors.Refused):
        client.call("kvtp", {"op": "run", "varref": CONTEXT, "policy": POLICY, "tiers": TIERS, "queries": ["a"]},
                    job=job)


def test_a_budget_below_one_steps_working_set_is_a_typed_refusal(client):
    job = new_job(client, {"kv_blocks": 64})
    small = {**TIERS, "device_blocks": 4}  # top-4 + sink + window = 7 blocks at once
    with pytest.raises(errors.Refused) as info:
        client.call("kvtp", {"op": "run", "varref": CONTEXT, "policy": POLICY, "tiers": small, "queries": ["a"]},
                    job=job)
    assert "working set" in str(info.value)
    # the reservation was released: 64 can be held again
    again = client.call("mmi.gate.reserve", {"job": job, "resource": "kv_blocks", "amount": 64})
    client.call("mmi.gate.release", {"reservation": again["reservation"]})


def test_bad_long_requests_are_typed(client):
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "long_open", "varref": {"length": 10}, "tiers": TIERS})
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "long_ask", "long": 999, "queries": ["a"]})
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "long_open", "varref": CONTEXT, "policy": {"name": "magic"}, "tiers": TIERS})


def test_precision_orders_are_checked_and_reach_the_decode_worker(client):
    with pytest.raises(errors.BadRequest) as info:
        client.call("popb", {"op": "order", "operators": {"L9.attn": "int8"}})
    assert "unknown operator" in str(info.value)
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "precision", "operators": {"L0.softmax": "fp16"}})
    opened = client.call("decode", {"op": "long_open", "varref": CONTEXT, "policy": POLICY, "tiers": TIERS})
    sid = opened["long"]
    try:
        assert opened["precision"]["avg_bits"] == 32.0
        # the order travels on ctl/decode/precision (PUB): wait, bounded, until the worker applied it
        client.call("popb", {"op": "order", "operators": {op: "int8" for op in popb.operators(load())}})
        deadline = time.monotonic() + WAIT
        while client.call("decode", {"op": "long_stats", "long": sid})["precision"]["avg_bits"] != 8.0:
            assert time.monotonic() < deadline, "precision order never applied"
            time.sleep(0.05)
        planned = client.call("popb", {"op": "plan", "avg_bits": 12, "publish": False, "length": 256})
        assert 8.0 <= planned["avg_bits"] <= 12.0 and planned["hot"] is not None
        applied = client.call("decode", {"op": "precision", **planned["order"]})
        assert applied["avg_bits"] == pytest.approx(planned["avg_bits"])
        name = next(iter(varref.make_context(random.Random(CONTEXT["seed"]), 1024, 4).values))
        answers = client.call("decode", {"op": "long_ask", "long": sid, "queries": [name]})
        assert answers["precision"]["avg_bits"] == pytest.approx(planned["avg_bits"])
    finally:
        client.call("decode", {"op": "precision", "reset": True})
        client.call("decode", {"op": "long_free", "long": sid})
