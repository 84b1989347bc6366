"""C-7 where it is used: scch's near-miss proposer accepts only verified answers; the kvtp cold
tier with nothing cold is exactly dense attention."""

import random

import pytest
import torch

from lm import varref
from lm.coldtier import ColdTierDecoder, train_codecs
from lm.longmodel import load
from reason.solve import compute
from services.scch.logic import SubgoalCache
from services.scch.nearmiss import NearMissProposer, embed
from services.scch.store import open_backend


@pytest.fixture
def cache_and_proposer():
    cache = SubgoalCache(open_backend("sqlite"), admit_min=0.0, seed=1)
    prop = NearMissProposer()
    for t, expr in enumerate(("sin(x)**2", "cos(x)**2 + 1")):
        cn = cache.canon({"kind": "integrate", "expr": expr, "var": "x"})
        assert cache.admit(cn, compute(cn.kind, cn.form), float(t))["admitted"]
        assert prop.remember(cn)
    return cache, prop


def test_near_miss_is_verified(cache_and_proposer):
    cache, prop = cache_and_proposer
    cn, served, _ = cache.get({"kind": "integrate", "expr": "1 - cos(x)**2", "var": "x"}, 10.0)
    assert served is None  # another canonical key: the exact cache misses
    got = prop.resolve(cache, cn)
    assert got is not None and got["near_miss"]
    assert got["how"].startswith("proved") or got["how"].startswith("points")
    # the accepted answer differentiates back to the query's integrand
    import sympy as sp

    x = sp.Symbol("x")
    assert sp.simplify(sp.diff(sp.sympify(got["answer"]), x) - (1 - sp.cos(x) ** 2)) == 0


def test_decoy_is_rejected(cache_and_proposer):
    cache, prop = cache_and_proposer
    cn, served, _ = cache.get({"kind": "integrate", "expr": "sin(x)**2 + 2", "var": "x"}, 11.0)
    assert served is None
    assert prop.propose(cn)  # similar entries exist ...
    assert prop.resolve(cache, cn) is None  # ... and none of their answers is right: nothing served
    assert prop.counts.rejected >= 1 and prop.counts.accepted == 0


def test_embedding_is_deterministic_and_bounded(cache_and_proposer):
    cache, _ = cache_and_proposer
    cn = cache.canon({"kind": "solve", "expr": "x**2 - 2 = 0", "var": "x"})
    a, b = embed(cn), embed(cn)
    assert (a == b).all() and float(abs(a).max()) <= 1.0


def test_cold_tier_with_nothing_cold_equals_dense():
    torch.set_num_threads(1)
    model = load()
    ctx = varref.make_context(random.Random(5), 200, 2)
    with torch.no_grad():
        _, keys, vals = model(torch.tensor([list(ctx.tokens)]), return_kv=True)
    codecs = train_codecs(model, ctx.tokens, 8, capacity=64, steps=2)
    dec = ColdTierDecoder(model, codecs, block=64, window=1000)  # window covers the context: no cold block
    dec.load(ctx.tokens, keys, vals)
    assert dec.n_cold == 0
    name = next(iter(ctx.values))
    dec.feed(ctx.query(name))
    with torch.no_grad():
        dense = model(torch.tensor([list(ctx.tokens) + ctx.query(name)]))[0, -1]
    assert torch.allclose(dec.last_logits, dense, atol=1e-4)


def test_cold_tier_compresses_distant_blocks():
    torch.set_num_threads(1)
    model = load()
    ctx = varref.make_context(random.Random(6), 640, 2)
    with torch.no_grad():
        _, keys, vals = model(torch.tensor([list(ctx.tokens)]), return_kv=True)
    codecs = train_codecs(model, ctx.tokens, 16, capacity=256, steps=5)
    dec = ColdTierDecoder(model, codecs, block=64, window=128, topk=2)
    dec.load(ctx.tokens, keys, vals)
    assert dec.n_cold > 0
    dense_bytes = keys.numel() * 4 * 2
    assert dec.cold_bytes() + dec.exact_bytes() < dense_bytes
    dec.feed(ctx.query(next(iter(ctx.values))))
    assert dec.retrieved == 2 * model.cfg.n_layers * 2  # two query tokens, top-2 per layer
