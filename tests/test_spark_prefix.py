"""The KV prefix cache (spark/prefix.py) over the chain LM's paged engine: the same greedy tokens
as without it, prefill saved on shared prefixes, bounded by its block budget, refcounts exact."""

from __future__ import annotations

import random

import pytest

from lm import chains, tokenizer
from lm.engine import Engine
from spark.prefix import PrefixCache


@pytest.fixture(scope="module")
def model():
    from lm.train import load

    return load()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Questions sharing their first items (a common prefix of several blocks), some repeated."""
    rng = random.Random(seed)
    base = chains.random_items(rng, 3)
    out = []
    for i in range(n):
        items = base[: 1 + i % 3] + chains.random_items(rng, 1 + i % 2)
        out.append(tokenizer.encode(chains.prompt(items)))
    return out + out[:3]


def greedy(engine: Engine, start, prompt: list[int], n: int = 12) -> list[int]:
    sid = start(prompt)
    engine.generate(sid, n)
    toks = engine.tokens(sid)
    engine.free(sid)
    return toks


def test_tokens_identical_and_prefill_saved(model):
    plain = Engine(model, num_blocks=256, block_size=4)
    cached = Engine(model, num_blocks=256, block_size=4)
    cache = PrefixCache(cached, max_blocks=64)
    ps = prompts(10)
    for p in ps:
        assert greedy(cached, cache.start, p) == greedy(plain, plain.start, p)
        cache.check()
    st = cache.stats
    assert st.hits > 0 and st.reused_tokens > 0 and 0 < st.hit_rate <= 1
    assert cached.stats().prefilled == plain.stats().prefilled - st.reused_tokens
    cache.clear()
    cached.check_invariants()
    assert cached.cache.allocator.num_free == 256


def test_the_cache_stays_within_its_block_budget_and_evicts_leaves(model):
    engine = Engine(model, num_blocks=128, block_size=4)
    cache = PrefixCache(engine, max_blocks=6)
    for p in prompts(12, seed=3):
        sid = cache.start(p)
        assert cache.size <= 6
        cache.check()
        engine.free(sid)
    assert cache.stats.evicted_blocks > 0
    cache.clear()
    engine.check_invariants()
    assert engine.cache.allocator.num_free == 128


def test_a_zero_budget_cache_never_holds_a_block_and_bad_input_is_refused(model):
    engine = Engine(model, num_blocks=64, block_size=4)
    cache = PrefixCache(engine, max_blocks=0)
    p = prompts(1)[0]
    assert greedy(engine, cache.start, p) == greedy(engine, engine.start, p)
    assert cache.size == 0 and cache.stats.reused_tokens == 0
    with pytest.raises(ValueError):
        PrefixCache(engine, max_blocks=-1)
    with pytest.raises(ValueError):
        cache.start([])
    from lm.errors import ContextTooLongError

    with pytest.raises(ContextTooLongError):
        cache.start([tokenizer.BOS] * (engine.max_len + 1))
    engine.check_invariants()


def test_namespaces_never_share_blocks(model):
    """One tree per namespace (the decode service's principal): a prompt cached in one is a miss
    in another, and every namespace counts against the one bound."""
    engine = Engine(model, num_blocks=128, block_size=4)
    cache = PrefixCache(engine, max_blocks=6)
    p = prompts(1)[0]
    alice = greedy(engine, lambda t: cache.start(t, ns="alice"), p)
    assert cache.stats.reused_tokens == 0
    assert greedy(engine, lambda t: cache.start(t, ns="mallory"), p) == alice
    assert cache.stats.reused_tokens == 0  # mallory did not hit alice's blocks
    assert greedy(engine, lambda t: cache.start(t, ns="alice"), p) == alice
    assert cache.stats.reused_tokens > 0  # alice hits her own
    assert cache.size <= 6
    cache.check()
