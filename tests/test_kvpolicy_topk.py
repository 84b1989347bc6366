"""C-5: per-query top-k keys as a kvtp selection policy (lm/kvpolicy.py TopKKeys) and the dense
rule (topk_sparse_attention): numerics against a dense reference, tiering cannot change an
output, k_top > seq_k is a typed error before anything is created."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lm import varref
from lm.errors import LMError
from lm.kvpolicy import FullAttention, TopKError, TopKKeys, attend, topk_sparse_attention
from lm.kvtiers import TieredKV
from lm.longdecode import LongDecoder, TierSpec, answer_tokens
from lm.longmodel import load
from lm.longsession import LongSessions, RequestError, parse_policy

L, H, D, BS = 2, 4, 16, 8


def _tiers(T, device_blocks=None, seed=0):
    g = np.random.default_rng(seed)
    keys = g.standard_normal((L, T, H, D)).astype(np.float32)
    vals = g.standard_normal((L, T, H, D)).astype(np.float32)
    n = -(-T // BS)
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=BS,
                     device_blocks=device_blocks or n, host_blocks=n)  # fmt: skip
    tiers.load(keys, vals)
    return tiers, keys, vals


def test_dense_rule_against_a_hand_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 5, 8, generator=g),
        torch.randn(2, 3, 11, 8, generator=g),
        torch.randn(2, 3, 11, 4, generator=g),
    )
    full = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(topk_sparse_attention(q, k, v, 11), full)
    out = topk_sparse_attention(q, k, v, 3)
    sc = q @ k.transpose(-2, -1) / math.sqrt(8)
    for idx in np.ndindex(2, 3, 5):
        top = sc[idx].topk(3).indices
        want = torch.softmax(sc[idx][top], -1) @ v[idx[0], idx[1]][top]
        torch.testing.assert_close(out[idx], want)


@pytest.mark.parametrize("k_top", [12, 0, -1, True, 2.0])
def test_dense_rule_refuses_bad_k_top(k_top):
    q = k = v = torch.zeros(1, 4, 3)
    with pytest.raises(TopKError) as exc:
        topk_sparse_attention(q, k[:, :3] if k_top == 12 else k, v[:, :3] if k_top == 12 else v, k_top)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, LMError)


@pytest.mark.parametrize("T,k_top", [(61, 9), (64, 64), (40, 1)])
def test_policy_attends_exactly_the_top_keys(T, k_top):
    tiers, keys, vals = _tiers(T)
    q = np.random.default_rng(5).standard_normal((H, D)).astype(np.float32)
    pol = TopKKeys(k_top=k_top, chunk_blocks=3)
    for layer in range(L):
        blocks = pol.select(layer, q, tiers)
        out, _ = attend(torch.from_numpy(q), blocks, tiers, layer, pol.chunk_blocks, keep=pol.keep(blocks, tiers))
        qt = torch.from_numpy(q)[:, None, :]  # [H, 1, D]
        kt = torch.from_numpy(keys[layer]).transpose(0, 1)  # [H, T, D]
        vt = torch.from_numpy(vals[layer]).transpose(0, 1)
        want = topk_sparse_attention(qt, kt, vt, k_top)[:, 0]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert pol.touched == tiers.num_blocks  # exact top-k reads every key block
        chosen_blocks = {
            int(b)
            for b in (torch.from_numpy(np.einsum("hd,thd->ht", q, keys[layer])).topk(k_top).indices // BS).unique()
        }
        assert set(blocks) == chosen_blocks and pol.value_blocks == len(blocks)


def test_a_small_arena_gives_the_same_output():
    big, _, _ = _tiers(200)
    small, _, _ = _tiers(200, device_blocks=4)
    q = np.random.default_rng(9).standard_normal((H, D)).astype(np.float32)
    outs = []
    for tiers in (big, small):
        pol = TopKKeys(k_top=20, chunk_blocks=2)
        blocks = pol.select(1, q, tiers)
        outs.append(attend(torch.from_numpy(q), blocks, tiers, 1, 2, keep=pol.keep(blocks, tiers))[0])
    assert torch.equal(outs[0], outs[1])
    big.close(), small.close()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load()


def test_decoder_keeping_all_but_the_decoded_keys_answers_as_full_attention(model):
    """k_top = the prompt's 300 keys: each decode step drops only its lowest-scoring 1-3 keys (the
    context grows as the answer is decoded), so answers and logits stay those of full attention."""
    ctx = varref.make_context(random.Random(4), 300, 4)
    name = next(iter(ctx.values))
    outs = []
    for policy in (FullAttention(chunk_blocks=4), TopKKeys(k_top=300, chunk_blocks=4)):
        with LongDecoder(model, policy, TierSpec.resident(320, 64)) as dec:
            dec.prefill(ctx.tokens)
            outs.append((answer_tokens(dec, ctx.query(name)), dec.logits.clone()))
    assert outs[0][0] == outs[1][0]
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0.05, atol=0.05)


def test_k_top_beyond_the_context_is_refused_before_anything_exists(model):
    ctx = varref.make_context(random.Random(4), 100, 2)
    dec = LongDecoder(model, TopKKeys(k_top=101, chunk_blocks=2), TierSpec.resident(128, 64))
    with pytest.raises(TopKError):
        dec.prefill(ctx.tokens)
    assert dec.tokens == [] and dec.tiers.num_blocks == 0
    dec.close()
    sessions = LongSessions(model)
    req = {"varref": {"length": 100, "vars": 2, "seed": 1}, "policy": {"name": "topk_keys", "k_top": 101},
           "tiers": {"device_blocks": 16, "host_blocks": 16}}  # fmt: skip
    with pytest.raises(TopKError):
        sessions.open(req)
    assert sessions.decoders == {}
    sid = sessions.open({**req, "policy": {"name": "topk_keys", "k_top": 64}})
    assert sessions.decoders[sid].policy.describe() == {"policy": "topk_keys", "k_top": 64, "chunk_blocks": 16}
    sessions.close()


@pytest.mark.parametrize("m", [{"name": "topk_keys", "k_top": 0}, {"name": "topk_keys", "k_top": "8"},
                               {"name": "topk_keys", "chunk_blocks": 0}, {"name": "topk"}])  # fmt: skip
def test_bad_policy_requests(m):
    with pytest.raises(RequestError):
        parse_policy(m)
    with pytest.raises(TopKError):
        TopKKeys(k_top=0)
