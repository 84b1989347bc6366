"""The KV prefix cache wired into the decode worker, through a real kernel and on the shipped
weights: greedy tokens identical to decoding without it, prefill saved on shared and repeated
prompts, the cache bounded by its ``kv_blocks`` and evicting, RoI-S repairs inserted; and the
second served model (``spark``, the procedural integration model)."""

from __future__ import annotations

import random

import pytest
import zmq

from clients import Client
from kernel import errors
from lm import chains, tokenizer
from tests.support import KernelProcess, service_block

pytestmark = pytest.mark.system

WAIT = 60.0
#: Greedy decoding gets item 1's sum wrong with the shipped weights (see test_decode_services).
WRONG_PROMPT = "Q:10+38*7,13+3*9,24+19*8;"


@pytest.fixture(scope="module")
def client():
    services = (
        service_block("decode", "services.decode", args=["--dtype", "float64"])
        + service_block(
            "decode4", "services.decode", args=["--name", "decode4", "--dtype", "float64", "--prefix-blocks", "4"]
        )
        + service_block("rois", "services.rois")
        + service_block(
            "decode8", "services.decode", args=["--name", "decode8", "--num-blocks", "8", "--prefix-blocks", "8"]
        )
    )
    k = KernelProcess(services, heartbeat=0.2, liveness=5)
    try:
        with Client(k.endpoint, timeout=60, retries=0, context=zmq.Context.instance()) as c:
            for name in ("decode", "decode4", "rois", "decode8"):
                c.wait_for_service(name, WAIT)
            yield c
    finally:
        k.stop()


def questions(n: int, seed: int = 0) -> list[str]:
    """Chain questions sharing their first items (several 16-token blocks), some repeated."""
    rng = random.Random(seed)
    base = chains.random_items(rng, 4)
    out = [chains.prompt(base[: 2 + i % 3] + chains.random_items(rng, 1)) for i in range(n)]
    return out + out[:3]


def generate(c: Client, service: str, prompt: str, **kw) -> dict:
    return c.call(service, {"op": "generate", "prompt": prompt, "max_new": 24, "keep": False, **kw})


def test_tokens_identical_with_and_without_the_cache_and_prefill_saved(client):
    qs = questions(8)
    plain = [generate(client, "decode", q, prefix=False)["tokens"] for q in qs]
    before = client.call("decode", {"op": "stats"})
    cached = [generate(client, "decode", q) for q in qs]
    after = client.call("decode", {"op": "stats"})
    assert [r["tokens"] for r in cached] == plain
    reused = sum(r["prefix_reused"] for r in cached)
    assert reused > 0 and cached[-1]["prefix_reused"] >= 16  # a repeated prompt reuses its blocks
    st = after["prefix"]
    assert st["enabled"] and st["hits"] > before["prefix"]["hits"] and 0 < st["blocks"] <= st["max_blocks"]
    prompt_tokens = sum(len(tokenizer.encode(q)) for q in qs)
    prefilled = after["counters"]["prefilled"] - before["counters"]["prefilled"]
    assert prefilled == prompt_tokens - reused  # the saved tokens were not prefilled


def test_the_cache_stays_within_its_kv_blocks_and_evicts(client):
    for q in questions(10, seed=1):
        generate(client, "decode4", q)
    st = client.call("decode4", {"op": "stats"})["prefix"]
    assert st["max_blocks"] == 4 and st["blocks"] <= 4 and st["evicted_blocks"] > 0


def test_a_repaired_text_hits_the_cache(client):
    job = f"t-prefix-{random.random()}"
    client.open_job(job, {})
    gen = client.call("decode", {"op": "generate", "prompt": WRONG_PROMPT, "max_new": 80}, job=job)
    out = client.call("rois", {"op": "repair", "decode": gen["decode"], "width": 8}, job=job)
    assert out["ok"] and "13+27=40" in out["text"]
    client.call("decode", {"op": "free", "decode": gen["decode"]}, job=job)
    # a prompt that continues the repaired text reuses its blocks (the splice inserted them), and
    # decodes as it does without the cache
    follow = out["text"][: out["text"].index("13+27=40") + 9]
    hit = generate(client, "decode", follow, max_new=8)
    blocks = (len(tokenizer.encode(follow)) - 1) // 16
    assert blocks >= 2 and hit["prefix_reused"] == 16 * blocks
    assert hit["tokens"] == generate(client, "decode", follow, max_new=8, prefix=False)["tokens"]


def test_an_approximate_splice_is_never_cached(client):
    # mode=approx keeps the suffix's old KV (conditioned on the old span): a later prompt with
    # the repaired tokens must not reuse it, or it decodes other tokens than without the cache
    prompt = chains.prompt(chains.random_items(random.Random(1), 5))
    gen = client.call("decode", {"op": "generate", "prompt": prompt, "max_new": 40})
    comma = prompt.index(",")
    out = client.call(
        "decode",
        {
            "op": "splice",
            "decode": gen["decode"],
            "start": 3,
            "end": comma + 2,
            "mode": "approx",
            "recompute": 1,
            "verify": False,
            "width": 4,
        },
    )
    client.call("decode", {"op": "free", "decode": gen["decode"]})
    ask = {"op": "generate", "tokens": out["tokens"], "max_new": 16, "keep": False}
    hit = client.call("decode", ask)
    assert hit["tokens"] == client.call("decode", dict(ask, prefix=False))["tokens"]


def test_bad_model_and_prompt_over_the_context_are_typed(client):
    with pytest.raises(errors.BadRequest) as exc:
        client.call("decode", {"op": "generate", "prompt": "Q:1+2*3;", "model": "nope"})
    assert exc.value.detail["kind"] == "UnknownModel"
    with pytest.raises(errors.BadRequest) as exc:
        client.call("decode", {"op": "generate", "tokens": [tokenizer.BOS] * 300, "max_new": 1})
    assert exc.value.detail["kind"] == "ContextTooLongError"
    st = client.call("decode", {"op": "stats"})
    assert "spark" in st["models"] and st["prefix"]["enabled"]


def test_the_spark_model_is_served_as_a_second_model(client):
    import torch

    from lm.engine import Engine
    from spark import procedural

    q = "Q:17+25*3,40+12*7;"
    first = generate(client, "decode", q, model="spark", prefix=False)
    again = generate(client, "decode", q, model="spark")
    third = generate(client, "decode", q, model="spark")
    assert first["model"] == "spark" and first["tokens"] == again["tokens"] == third["tokens"]
    assert third["prefix_reused"] >= 16
    ref = Engine(procedural.load(dtype=torch.float64), num_blocks=64)
    sid = ref.start(tokenizer.encode(q))
    ref.generate(sid, 24)
    assert ref.tokens(sid) == first["tokens"]
    st = client.call("decode", {"op": "stats", "model": "spark"})
    assert st["model"] == "spark" and "spark" in st["loaded"] and st["prefix"]["hits"] >= 1


def test_a_full_pool_takes_the_cache_blocks_back_before_refusing(client):
    """An 8-block pool whose cache may hold all 8: once the cache holds most of the pool, a new
    decode gets its blocks by the cache giving its own back (and is not refused)."""
    outs = [generate(client, "decode8", q, max_new=20) for q in questions(6, seed=2)]
    assert all(len(o["new"]) == 20 for o in outs)
    st = client.call("decode8", {"op": "stats"})
    assert st["prefix"]["pressure_evictions"] > 0 and st["prefix"]["blocks"] <= 8
