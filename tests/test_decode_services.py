"""System tests of the decode worker and the IDS / RoI-S / LoT services through a real kernel.

One ``python -m kernel`` for the module runs ``decode`` (float64, so that a prefill and a step-wise
decode agree to ~1e-14 and greedy tokens compare exactly, see docs/decode.md), ``ids``, ``rois``
and ``lot``.  Reference tokens come from an in-process :class:`lm.engine.Engine` on the same
weights and dtype.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
import zmq

from clients import AsyncClient, Client
from clients.core import raise_for
from kernel import errors
from kernel import protocol as P
from lm import tokenizer
from lm.engine import Engine
from lm.thunks import find_thunks
from lm.verifier import verify
from tests.support import KernelProcess, service_block

pytestmark = pytest.mark.system

#: Greedy decoding of this question with the shipped weights gets item 1's sum wrong
#: ("13+27=30"); found offline by scanning random 3-item questions (docs/decode.md).
WRONG_PROMPT = "Q:10+38*7,13+3*9,24+19*8;"
LONG_PROMPT = "Q:23+4*8,7+37*8,16+3*9,75+8*3,1+2*2;"
LAZY_PROMPT = "L:10+38*7,13+3*9,24+19*8;"
WAIT = 60.0


@pytest.fixture(scope="module")
def kern():
    services = (service_block("decode", "services.decode", args=["--dtype", "float64"])
                + "".join(service_block(n, f"services.{n}") for n in ("ids", "rois", "lot")))
    k = KernelProcess(services, heartbeat=0.2, liveness=5)
    try:
        with Client(k.endpoint, timeout=10, retries=0, context=zmq.Context.instance()) as c:
            for name in ("decode", "ids", "rois", "lot"):
                c.wait_for_service(name, WAIT)
        yield k
    finally:
        k.stop()


@pytest.fixture(scope="module")
def ref():
    return Engine.load(dtype=torch.float64, num_blocks=256)


@pytest.fixture
def client(kern):
    c = Client(kern.endpoint, timeout=30, retries=0, context=zmq.Context.instance())
    yield c
    c.close()


def greedy(ref: Engine, tokens: list[int], max_new: int) -> list[int]:
    sid = ref.start(tokens)
    try:
        return ref.generate(sid, max_new)
    finally:
        ref.free(sid)


def new_job(c: Client, budget: dict | None = None) -> str:
    job = f"t-{uuid.uuid4().hex[:8]}"
    c.open_job(job, budget or {})
    return job


def stream_tokens(replies) -> tuple[list[int], list, object]:
    """(streamed tokens, every reply, the FINAL's payload)."""
    toks, seen, final = [], [], None
    for r in replies:
        seen.append(r)
        if r.final:
            final = r.payload
        elif isinstance(r.payload, dict) and "token" in r.payload:
            toks.append(r.payload["token"])
    return toks, seen, final


def test_streamed_tokens_equal_engine_greedy_and_are_charged(client, ref):
    job = new_job(client)
    prompt = tokenizer.encode(LONG_PROMPT)
    toks, seen, final = stream_tokens(client.stream("decode", {"op": "generate", "prompt": LONG_PROMPT,
                                                                "max_new": 90}, job=job))
    expected = greedy(ref, prompt, 90)
    assert toks == expected and final["new"] == expected and final["tokens"] == prompt + expected
    assert seen[0].payload["start"] == len(prompt)
    # charged per token: the last PARTIAL already carries every forward; the job's ledger agrees
    spend = client.call("mmi.job.stats", {"job": job})["spent"]
    assert spend["tokens"] == len(prompt) + len(expected)
    assert spend["decoded"] == len(expected) and spend["prefilled"] == len(prompt)
    assert client.call("decode", {"op": "free", "decode": final["decode"]}) == {"decode": final["decode"],
                                                                               "freed": True}


class Lost(Exception):
    """The generate finished before the action reached it (see :func:`_generate_with`)."""


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` is the typed answer to an action on a generate that had already ended:
    a legitimate outcome (the 80 tokens can outrun the action's hops through the kernel on a
    busy machine: caught at load 21), not a defect."""
    if isinstance(exc, Lost):
        return True
    if isinstance(exc, errors.BadRequest):
        return exc.detail.get("kind") == "NotRunning"  # ids: no generate running to pause
    if isinstance(exc, errors.Refused):  # ids: ended before a safe point; mmi.*: the request is gone
        return isinstance(exc, errors.NotFound) or "ended before it reached a safe point" in exc.message
    return False


#: Scenarios run again when the action lost that race (each attempt a fresh generate).
ATTEMPTS = 6


async def _generate_with(kern, payload: dict, at_token: int, action, **kw) -> tuple[list[int], list, dict]:
    """Stream a generate; when ``at_token`` tokens have arrived, run ``action(client, first_partial)``
    on a second client while the stream goes on.  The action races the rest of the generate; when
    the generate wins (:func:`_lost`), its decode is freed and the scenario runs again, bounded by
    :data:`ATTEMPTS`, so the test's outcome does not depend on how the machine schedules it."""
    for _ in range(ATTEMPTS):
        async with AsyncClient(kern.endpoint, timeout=30, retries=0) as a, \
                AsyncClient(kern.endpoint, timeout=30, retries=0) as b:
            toks, seen = [], []
            task = None
            async for r in a.stream("decode", payload, **kw):
                seen.append(r)
                if not r.final and isinstance(r.payload, dict) and "token" in r.payload:
                    toks.append(r.payload["token"])
                    if len(toks) == at_token:
                        task = asyncio.ensure_future(action(b, seen[0].payload))
                if r.final:
                    final = r.payload
            assert task is not None
            try:
                done = await asyncio.wait_for(task, WAIT)
            except Exception as exc:
                if not _lost(exc):
                    raise
                await a.call("decode", {"op": "free", "decode": final["decode"]})
                continue
            return toks, seen, {"final": final, "action": done}
    pytest.fail(f"the generate finished before the action reached it in {ATTEMPTS} attempts")


async def test_preempt_pauses_at_token_boundary_and_resume_is_exact(kern, ref):
    prompt = tokenizer.encode(LONG_PROMPT)

    async def preempt_then_resume(b: AsyncClient, head: dict) -> dict:
        await b.call("mmi.preempt", {"token": head["kernel_token"], "service": "decode"})
        st = await b.call("decode", {"op": "state", "decode": head["decode"], "wait_paused_ms": 5000})
        if not st["running"]:
            raise Lost()  # finished at the boundary the preempt would have paused at
        assert st["paused"] and st["state"] == "paused"
        await b.call("mmi.resume", {"token": head["kernel_token"], "service": "decode"})
        return st

    toks, seen, out = await _generate_with(kern, {"op": "generate", "prompt": LONG_PROMPT, "max_new": 90}, 6,
                                           preempt_then_resume)
    assert toks == greedy(ref, prompt, 90)
    statuses = [r.status for r in seen]
    assert statuses.count(P.STATUS_PAUSED) == 1
    i = statuses.index(P.STATUS_PAUSED)
    # paused exactly at the boundary the decode worker reported
    before = sum(1 for r in seen[:i] if isinstance(r.payload, dict) and "token" in r.payload)
    assert out["action"]["position"] == len(prompt) + before


async def test_ids_inject_equals_from_scratch_decode(kern, ref):
    inject = "19*8=152;"

    async def interrupt(b: AsyncClient, head: dict) -> dict:
        return await b.call("ids", {"op": "interrupt", "decode": head["decode"], "text": inject})

    toks, seen, out = await _generate_with(kern, {"op": "generate", "prompt": WRONG_PROMPT, "max_new": 80}, 4,
                                           interrupt)
    final, act = out["final"], out["action"]
    assert act["resumed"] and act["pause_ms"] > 0
    full = final["tokens"]
    at = act["position"]  # context length after the injection
    assert tokenizer.decode(full[at - len(inject):at]) == inject
    # the paused-injected-resumed decode = a from-scratch greedy decode of the same final context
    assert full[at:] == greedy(ref, full[:at], len(full) - at)
    assert [r.status for r in seen].count(P.STATUS_PAUSED) == 1


def test_rois_repairs_known_wrong_chain_redecoding_only_the_span(client):
    job = new_job(client)
    gen = client.call("decode", {"op": "generate", "prompt": WRONG_PROMPT, "max_new": 80}, job=job)
    before = verify(gen["text"])
    assert not before.ok and before.first_error.kind == "add" and before.first_error.item == 1
    spent0 = client.call("mmi.job.stats", {"job": job})["spent"]
    out = client.call("rois", {"op": "repair", "decode": gen["decode"], "width": 8}, job=job)
    assert out["ok"] and out["rounds"] == 1
    (sp,) = out["splices"]
    s, e = sp["span"]
    assert [s - 1, e - 1] == list(before.first_error.region)
    text0, text1 = gen["text"], out["text"]
    shift = len(sp["new"]) - len(sp["old"])
    assert text1[:s - 1] == text0[:s - 1] and text1[e - 1 + shift:] == text0[e - 1:]  # prefix, suffix kept
    assert verify(text1).ok and verify(text1).values[1] == 13 + 3 * 9
    spent1 = client.call("mmi.job.stats", {"job": job})["spent"]
    # the only decoding was the span's beam; the suffix was prefilled once, nothing else decoded
    assert spent1["decoded"] - spent0["decoded"] == sp["repaired"] == spent1["repaired"]
    assert spent1["recomputed"] == sp["suffix_len"]
    client.call("decode", {"op": "free", "decode": gen["decode"]})


def test_lot_forces_only_the_demanded_thunk(client):
    job = new_job(client)
    gen = client.call("decode", {"op": "generate", "prompt": LAZY_PROMPT, "max_new": 80}, job=job)
    assert verify(gen["text"]).thunked == (0, 1, 2)
    listed = client.call("lot", {"op": "thunks", "decode": gen["decode"]}, job=job)
    assert [t["args"] for t in listed["thunks"]] == ["10+38*7", "13+3*9", "24+19*8"]
    out = client.call("lot", {"op": "demand", "decode": gen["decode"], "item": 2}, job=job)
    assert out["forced"] and out["value"] == 24 + 19 * 8
    assert out["expansion"] == "19*8=152;24+152=176"
    assert [t.args for t in find_thunks(out["text"])] == ["10+38*7", "13+3*9"]
    assert out["pending_cost"] == sum(t["cost"] for t in listed["thunks"][:2])
    t1, t2 = listed["thunks"][1]["chars"], listed["thunks"][2]["chars"]
    shift = len(out["text"]) - len(gen["text"])
    assert out["text"][:t2[0]] == gen["text"][:t2[0]]  # everything before the forced thunk kept
    assert out["text"][t2[1] + shift:] == gen["text"][t2[1]:]  # and everything after it
    spent = client.call("mmi.job.stats", {"job": job})["spent"]
    again = client.call("lot", {"op": "demand", "decode": gen["decode"], "item": 2}, job=job)
    assert not again["forced"] and again["value"] == 176
    assert client.call("mmi.job.stats", {"job": job})["spent"] == spent  # a forced value costs nothing
    with pytest.raises(errors.Refused) as exc:
        client.call("lot", {"op": "demand", "decode": gen["decode"], "item": 0}, job=job, budget={"tokens": 5})
    assert exc.value.detail["estimate"] > 5
    assert client.call("lot", {"op": "thunks", "decode": gen["decode"]})["thunks"][0]["args"] == "10+38*7"
    client.call("decode", {"op": "free", "decode": gen["decode"]})


def test_tokens_budget_exhausted_mid_decode_ends_stream(client):
    job = new_job(client, {"tokens": 40})
    n_prompt = len(tokenizer.encode(LONG_PROMPT))
    replies = []
    with pytest.raises(errors.BudgetExceeded):
        for r in client.stream("decode", {"op": "generate", "prompt": LONG_PROMPT, "max_new": 90,
                                              "prefix": False}, job=job):  # the whole prompt prefilled
            replies.append(r)
            if r.final:
                raise_for(r)
    tokens = [r for r in replies if isinstance(r.payload, dict) and "token" in r.payload]
    assert 0 < len(tokens) <= 40 - n_prompt + 1 < 90
    stats = client.call("mmi.job.stats", {"job": job})
    assert stats["exhausted"] == "tokens" and stats["spent"]["tokens"] >= 40
    with pytest.raises(errors.BudgetExceeded):  # the job takes no new work
        client.call("decode", {"op": "stats"}, job=job)


def test_bad_input_is_typed_and_the_worker_keeps_serving(client):
    gen = client.call("decode", {"op": "generate", "prompt": WRONG_PROMPT, "max_new": 5})
    did, n = gen["decode"], len(gen["tokens"])
    with pytest.raises(errors.BadRequest) as exc:
        client.call("decode", {"op": "splice", "decode": did, "start": n - 2, "end": n + 3})
    assert exc.value.detail["kind"] == "SpanError"
    with pytest.raises(errors.BadRequest) as exc:
        client.call("decode", {"op": "splice", "decode": did, "start": 0, "end": 2, "verify": False})
    assert exc.value.detail["kind"] == "SpanError"
    with pytest.raises(errors.BadRequest) as exc:
        client.call("ids", {"op": "inject", "decode": 10_000, "text": "1;"})
    assert exc.value.detail["kind"] == "UnknownSequenceError"
    with pytest.raises(errors.BadRequest) as exc:
        client.call("ids", {"op": "resume", "decode": did})
    assert exc.value.detail["kind"] == "NotPausedError"
    with pytest.raises(errors.BadRequest) as exc:
        client.call("ids", {"op": "pause", "decode": did})
    assert exc.value.detail["kind"] == "NotRunning"
    with pytest.raises(errors.BadRequest) as exc:
        client.call("decode", {"op": "inject", "decode": did, "tokens": [tokenizer.VOCAB_SIZE]})
    assert exc.value.detail["kind"] == "VocabularyError"
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "generate", "prompt": "Q:é;"})
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "launch"})
    with pytest.raises(errors.BadRequest):
        client.call("rois", {"op": "verify", "text": "no header"})
    assert client.call("decode", {"op": "state", "decode": did})["tokens"] == gen["tokens"]  # untouched
    more = client.call("decode", {"op": "generate", "decode": did, "max_new": 3})
    assert more["tokens"][:n] == gen["tokens"] and len(more["tokens"]) == n + 3
    client.call("decode", {"op": "free", "decode": did})
    with pytest.raises(errors.BadRequest):
        client.call("decode", {"op": "free", "decode": did})


def test_demo_reports_where_the_compute_went(client):
    from clients import demo_reasoning

    lines: list[str] = []
    fig = demo_reasoning.run(client, out=lines.append)
    assert fig["preempted"] == 1 and fig["preempted_paused_ms"] > 0  # the urgent request preempted one decode
    assert fig["repaired_ok"] and 0 < fig["repaired"] < fig["chain_tokens"]
    assert fig["tokens"] == fig["decoded"] + fig["prefilled"] <= fig["budget_tokens"]
    assert fig["remaining_tokens"] == fig["budget_tokens"] - fig["tokens"]
    assert fig["refused"] > 10 and fig["lazy_pending"] > 0
    assert any("RoI-S" in line for line in lines) and any("refused" in line for line in lines)
