"""The kvtp cold tier (lm.coldtier) as a selectable policy: the retrieval key equals Quest's bound,
the exception rows make a compressed block exact where its code is worst, and through a real
``python -m kernel`` the ``kvtp`` service answers like the in-process decoder, with typed errors
for bad settings and a typed refusal for an arena below one step's exact blocks."""

from __future__ import annotations

import random
import uuid

import pytest
import torch
import zmq

from clients import Client
from kernel import errors
from lm import varref
from lm.coldtier import ColdTierDecoder, ColdTierError, default_codecs
from lm.kvtiers import BudgetTooSmallError
from lm.longmodel import load
from lm.longsession import LongSessions, RequestError
from tests.support import KernelProcess, service_block

CONTEXT = {"length": 1024, "vars": 4, "seed": 3}
TIERS = {"device_blocks": 8, "host_blocks": 8, "block_size": 32}
POLICY = {"name": "cold", "topk": 2, "window": 2, "code_dim": 16, "exact_rows": 1}
WAIT = 60.0


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load()


def local_answers(model, policy: dict, ctx: varref.Context) -> list[str]:
    dec = ColdTierDecoder(
        model,
        default_codecs(model, policy["code_dim"]),
        block=TIERS["block_size"],
        window=policy["window"] * TIERS["block_size"],
        topk=policy["topk"],
        exact_rows=policy["exact_rows"],
    )
    dec.prefill(ctx.tokens)
    out = []
    for name in ctx.values:
        dec.feed(ctx.query(name))
        out.append(varref.decode(dec.generate(varref.ANSWER_LEN)))
    return out


def test_bound_retrieval_is_quests_ranking(model):
    ctx = varref.make_context(random.Random(11), 1024, 4)
    with torch.no_grad():
        _, keys, vals = model(torch.tensor([list(ctx.tokens)]), return_kv=True)
    dec = ColdTierDecoder(model, None, block=32, window=64, topk=3)
    dec.load(ctx.tokens, keys, vals)
    q = torch.randn(model.cfg.n_heads, model.cfg.head_dim, generator=torch.Generator().manual_seed(0))
    k = keys[1, 32 : dec.cold_end].reshape(dec.n_cold, 32, model.cfg.n_heads, -1)
    # the exact maximum of q . k over each block's keys is <= the bound; the bound ranking is Quest's
    kmin, kmax = k.amin(1), k.amax(1)
    bound = torch.maximum(q * kmin, q * kmax).sum(-1).max(-1).values
    assert dec.search(1, q) == [int(j) for j in torch.argsort(-bound, stable=True)[:3]]
    assert ((q[None, None] * k).sum(-1).amax((1, 2)) <= bound + 1e-5).all()


def test_exception_rows_are_exact_and_counted(model):
    ctx = varref.make_context(random.Random(12), 1024, 4)
    with torch.no_grad():
        _, keys, vals = model(torch.tensor([list(ctx.tokens)]), return_kv=True)
    codecs = default_codecs(model, 8, steps=20)
    plain = ColdTierDecoder(model, codecs, block=32, window=64)
    plain.load(ctx.tokens, keys, vals)
    exact = ColdTierDecoder(model, codecs, block=32, window=64, exact_rows=2)
    exact.load(ctx.tokens, keys, vals)
    hd = model.cfg.n_heads * model.cfg.head_dim
    rows = torch.cat((keys[0, 32 : exact.cold_end].reshape(-1, hd), vals[0, 32 : exact.cold_end].reshape(-1, hd)), 1)
    assert len(exact.exceptions[0]) == 2 * exact.n_cold
    for j in range(exact.n_cold):
        bk, bv = exact._cold_block(0, j)
        pk, pv = plain._cold_block(0, j)
        got = torch.cat((bk.reshape(32, -1), bv.reshape(32, -1)), 1)
        base = torch.cat((pk.reshape(32, -1), pv.reshape(32, -1)), 1)
        want = rows[j * 32 : (j + 1) * 32]
        err_plain = (base - want).norm(dim=1)
        fixed = [r - j * 32 for r in exact.exceptions[0] if j * 32 <= r < (j + 1) * 32]
        # the two rows kept exact are the block's two worst-coded rows, now float16-exact
        assert sorted(fixed) == sorted(int(i) for i in torch.topk(err_plain, 2).indices)
        assert torch.allclose(got[fixed], want[fixed], atol=2e-3)
    assert exact.cold_bytes() > plain.cold_bytes()


def test_bad_settings_are_typed(model):
    with pytest.raises(ColdTierError):
        ColdTierDecoder(model, None, retrieval="cosine")
    with pytest.raises(ColdTierError):
        ColdTierDecoder(model, None, topk=0)
    with pytest.raises(ColdTierError):
        default_codecs(model, 10_000)
    sessions = LongSessions(model)
    req = {"varref": CONTEXT, "tiers": TIERS}
    for bad in ({"retrieval": "magic"}, {"topk": 0}, {"code_dim": 999}, {"exact_rows": 33}, {"window": "2"}):
        with pytest.raises(RequestError):
            sessions.open({**req, "policy": {**POLICY, **bad}})
    with pytest.raises(BudgetTooSmallError):  # 1 sink + 2 window + 2 retrieved > 4
        sessions.open({**req, "policy": POLICY, "tiers": {**TIERS, "device_blocks": 4}})
    assert not sessions.decoders


def test_long_sessions_serve_the_cold_tier(model):
    sessions = LongSessions(model)
    sid = sessions.open({"varref": CONTEXT, "policy": POLICY, "tiers": TIERS})
    dec = sessions.get(sid)
    ctx = varref.make_context(random.Random(CONTEXT["seed"]), CONTEXT["length"], CONTEXT["vars"])
    got = []
    for name in ctx.values:
        for tok in sessions.query_tokens(sid, name):
            dec.step(tok)
        got.append(varref.decode([dec.step(None) for _ in range(varref.ANSWER_LEN)]))
    assert got == local_answers(model, POLICY, ctx)
    st = sessions.stats(sid)
    assert st["tokens"] == CONTEXT["length"] + 4 * len(ctx.values) and st["retrieved"] > 0
    assert st["policy"]["policy"] == "cold" and st["cold_blocks"] == dec.n_cold > 0
    # the codes take less than the exact cold rows would (float32 [k|v] rows)
    assert st["cold_bytes"] < dec.n_cold * 32 * 2 * model.cfg.d_model * 4 * model.cfg.n_layers
    sessions.free(sid)
    assert not sessions.decoders


@pytest.fixture(scope="module")
def kern():
    services = "".join(service_block(n, f"services.{n}") for n in ("decode", "kvtp"))
    k = KernelProcess(services, heartbeat=0.2, liveness=10)
    try:
        with Client(k.endpoint, timeout=10, retries=0, context=zmq.Context.instance()) as c:
            for name in ("decode", "kvtp"):
                c.wait_for_service(name, WAIT)
        yield k
    finally:
        k.stop()


@pytest.mark.system
def test_kvtp_service_runs_the_cold_tier(kern, model):
    ctx = varref.make_context(random.Random(CONTEXT["seed"]), CONTEXT["length"], CONTEXT["vars"])
    expected = local_answers(model, POLICY, ctx)
    with Client(kern.endpoint, timeout=120, retries=0, context=zmq.Context.instance()) as c:
        job = f"cold-{uuid.uuid4().hex[:8]}"
        c.open_job(job, {"kv_blocks": 8})
        out = c.call(
            "kvtp",
            {"op": "run", "varref": CONTEXT, "policy": POLICY, "tiers": TIERS, "queries": list(ctx.values)},
            job=job,
        )
        assert [a["answer"] for a in out["answers"]] == expected
        assert out["policy"]["policy"] == "cold" and out["retrieved"] > 0 and out["kv_blocks"] == 8
        with pytest.raises(errors.BadRequest) as info:
            c.call(
                "kvtp",
                {
                    "op": "run",
                    "varref": CONTEXT,
                    "policy": {**POLICY, "retrieval": "magic"},
                    "tiers": TIERS,
                    "queries": ["a"],
                },
                job=job,
            )
        assert "retrieval" in str(info.value)
        with pytest.raises(errors.Refused) as info:
            c.call(
                "kvtp",
                {"op": "run", "varref": CONTEXT, "policy": {**POLICY, "topk": 6}, "tiers": TIERS, "queries": ["a"]},
                job=job,
            )
        assert "working set" in str(info.value)
        # every refusal gave the arena back: the whole budget can be held again
        again = c.call("mmi.gate.reserve", {"job": job, "resource": "kv_blocks", "amount": 8})
        c.call("mmi.gate.release", {"reservation": again["reservation"]})
