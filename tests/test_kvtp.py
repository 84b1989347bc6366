"""KV tiers (device arena / host / disk), attention policies and prefetch: outputs identical to
the all-resident run of the same policy, tier moves against a plain dense reference, typed
errors for bad input with nothing changed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lm import varref
from lm.kvpolicy import BlockSparse, FullAttention
from lm.kvpredict import Prefetcher
from lm.kvtiers import BudgetTooSmallError, DiskTierFullError, FreedBlockError, TieredKV
from lm.longdecode import LongDecoder, TierSpec, answer_tokens
from lm.longmodel import load

L, H, D = 2, 2, 4


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load()


@pytest.fixture(scope="module")
def context():
    return varref.make_context(random.Random(11), 1500, 4)


def decode_all(model, context, policy, spec, tmp_path) -> tuple[list[int], torch.Tensor, LongDecoder]:
    dec = LongDecoder(model, policy, spec, disk_dir=tmp_path)
    dec.prefill(context.tokens)
    out, logits = [], []
    for name in list(context.values) * 2:
        out += answer_tokens(dec, context.query(name))
        logits.append(dec.logits.clone())
    dec.tiers.check()
    return out, torch.stack(logits), dec


@pytest.mark.parametrize("policy", [BlockSparse(topk=3, sinks=1, window=2), FullAttention(chunk_blocks=4)],
                         ids=["sparse", "full-streamed"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on-demand"])
def test_tiering_never_changes_outputs(model, context, policy, prefetch, tmp_path) -> None:
    resident, res_logits, dec_r = decode_all(model, context, policy, TierSpec.resident(1600, 32), tmp_path)
    assert dec_r.tiers.stats.misses == 0  # every block written on the device
    dec_r.close()
    small = TierSpec(device_blocks=policy.working_set() + 2, host_blocks=20, disk_blocks=60,
                     block_size=32, prefetch=prefetch)
    tiered, tier_logits, dec_t = decode_all(model, context, policy, small, tmp_path)
    stats = dec_t.tiers.stats
    dec_t.close()
    assert tiered == resident
    assert torch.equal(tier_logits, res_logits)  # bit for bit, not just the argmax
    assert stats.misses > 0 and stats.demotions > 0 and stats.bytes_disk_to_device > 0  # every tier used
    if prefetch and isinstance(policy, FullAttention):
        assert stats.prefetched > 0


def test_block_sparse_reads_fewer_blocks_than_full(model, context, tmp_path) -> None:
    sparse = BlockSparse(topk=3)
    dec = LongDecoder(model, sparse, TierSpec.resident(1600, 32), disk_dir=tmp_path)
    dec.keep_selections = True
    dec.prefill(context.tokens)
    answer_tokens(dec, context.query(next(iter(context.values))))
    assert len(dec.selections) == len(context.query("a")) + varref.ANSWER_LEN
    for i, step in enumerate(dec.selections):
        current = (len(context.tokens) + i) // 32  # the block holding the step's own token
        for sel in step:
            assert sel == sorted(set(sel)) and len(sel) == 6
            assert {0, current - 1, current} <= set(sel)  # the sink and the recent window
            assert max(sel) == current
    dec.close()


def random_kv(rng: np.random.Generator, t: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.standard_normal((L, t, H, D)).astype(np.float32),
            rng.standard_normal((L, t, H, D)).astype(np.float32))


def test_tier_moves_match_a_plain_dense_reference(tmp_path) -> None:
    """Random loads, per-layer appends and acquires through a 5-slot arena, a 6-block host pool
    and a disk tier; after every operation each resident slot and each master copy equals the
    dense array of everything written."""
    rng = np.random.default_rng(0)
    bs = 8
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=bs, device_blocks=5,
                     host_blocks=6, disk_blocks=40, disk_dir=tmp_path, structure_weight=2.0)
    ref_k, ref_v = random_kv(rng, 37)
    tiers.load(ref_k, ref_v)
    for it in range(120):
        if it % 3 == 0:
            k, v = random_kv(rng, 1)
            for layer in range(L):
                tiers.append(layer, k[layer, 0], v[layer, 0])
            ref_k, ref_v = np.concatenate([ref_k, k], 1), np.concatenate([ref_v, v], 1)
        n = tiers.num_blocks
        want = sorted(set(rng.integers(0, n, rng.integers(1, 5)).tolist()))
        tiers.acquire(want)
        slots = tiers.slots(want)
        for b, s in zip(want, slots):
            lo, hi = b * bs, min((b + 1) * bs, ref_k.shape[1])
            np.testing.assert_array_equal(tiers.device[s, :, 0, : hi - lo], ref_k[:, lo:hi])
            np.testing.assert_array_equal(tiers.device[s, :, 1, : hi - lo], ref_v[:, lo:hi])
            np.testing.assert_array_equal(tiers.kmin[:, b], ref_k[:, lo:hi].min(1))
            np.testing.assert_array_equal(tiers.kmax[:, b], ref_k[:, lo:hi].max(1))
        tiers.release(want)
        tiers.observe_selection(np.bincount(want, minlength=n).astype(float))
        tiers.check()
    for b in range(tiers.num_blocks):
        lo, hi = b * bs, min((b + 1) * bs, ref_k.shape[1])
        np.testing.assert_array_equal(tiers.read_block(b)[:, 0, : hi - lo], ref_k[:, lo:hi])
    assert tiers.stats.demotions > 0 and tiers.stats.bytes_disk_to_device > 0
    tiers.close()


def test_eviction_is_lru_weighted_by_structure(tmp_path) -> None:
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=4, device_blocks=3, host_blocks=10)
    tiers.load(*random_kv(np.random.default_rng(1), 40))  # blocks 0..9
    for b in (1, 2, 3):
        tiers.acquire([b])
        tiers.release([b])
    counts = np.zeros(10)
    counts[1] = 10.0  # block 1: the oldest use, but selected again and again
    tiers.observe_selection(counts)
    tiers.acquire([4])  # evicts the lowest last_use + weight * structure: block 2, not block 1
    tiers.release([4])
    assert tiers.resident() == {1, 3, 4}
    plain = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=4, device_blocks=3, host_blocks=10,
                     structure_weight=0.0)
    plain.load(*random_kv(np.random.default_rng(1), 40))
    for b in (1, 2, 3, 4):
        plain.acquire([b])
        plain.release([b])
    assert plain.resident() == {2, 3, 4}  # plain LRU drops block 1


def test_prefetch_brings_predicted_blocks_in(tmp_path) -> None:
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=4, device_blocks=4, host_blocks=10)
    tiers.load(*random_kv(np.random.default_rng(2), 40))
    pf = Prefetcher(tiers, threads=2)
    try:
        assert tiers.resident() == {6, 7, 8, 9}  # the load wrote its last blocks on the device
        pf.submit([1, 2, 3], force=True)
        assert pf.wait_idle()
        assert {1, 2, 3} <= tiers.resident()
        assert tiers.acquire([1, 2, 3]) == 0.0  # all hits: no stall
        tiers.release([1, 2, 3])
        assert tiers.stats.prefetch_used == 3 and tiers.stats.misses == 0
        assert not pf.errors
    finally:
        pf.close()


# ---------------------------------------------------------------- bad input


def test_budget_smaller_than_one_step_is_refused_up_front(model) -> None:
    with pytest.raises(BudgetTooSmallError, match="working set"):
        LongDecoder(model, BlockSparse(topk=8), TierSpec(device_blocks=10, host_blocks=64))
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=4, device_blocks=3, host_blocks=10)
    tiers.load(*random_kv(np.random.default_rng(3), 40))
    before = (tiers.resident(), tiers.stats.misses)
    with pytest.raises(BudgetTooSmallError):
        tiers.acquire([0, 1, 2, 3])
    assert (tiers.resident(), tiers.stats.misses) == before
    tiers.acquire([0, 1])  # pinned: a third and fourth block cannot both come in
    with pytest.raises(BudgetTooSmallError):
        tiers.acquire([2, 3])
    tiers.release([0, 1])
    tiers.check()


def test_full_disk_tier_is_a_typed_error_and_changes_nothing(tmp_path) -> None:
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=4, device_blocks=2, host_blocks=2,
                     disk_blocks=2, disk_dir=tmp_path)
    rng = np.random.default_rng(4)
    tiers.load(*random_kv(rng, 16))  # 4 blocks: 2 on the host, 2 on disk
    with pytest.raises(DiskTierFullError):
        tiers.load(*random_kv(rng, 1))
    assert (tiers.num_blocks, tiers.n_tokens) == (4, 16)
    tiers.check()
    tiers.close()
    assert not list(tmp_path.iterdir())  # the memmap file is deleted


def test_a_freed_or_unknown_block_is_a_typed_error() -> None:
    tiers = TieredKV(n_layers=L, n_heads=H, head_dim=D, block_size=4, device_blocks=2, host_blocks=4)
    tiers.load(*random_kv(np.random.default_rng(5), 8))
    for bad in (2, -1, True, 1.0):
        with pytest.raises(FreedBlockError):
            tiers.acquire([bad])
    tiers.close()
    with pytest.raises(FreedBlockError):
        tiers.acquire([0])


def test_bad_policy_and_token_arguments(model) -> None:
    with pytest.raises(ValueError):
        BlockSparse(topk=-1)
    with pytest.raises(ValueError):
        FullAttention(chunk_blocks=0)
    dec = LongDecoder(model, BlockSparse(topk=2), TierSpec.resident(200, 32))
    with pytest.raises(varref.VocabularyError):
        dec.prefill([1, 2, 999])
    dec.prefill(varref.make_context(random.Random(0), 200, 2).tokens)
    with pytest.raises(varref.VocabularyError):
        dec.step(-3)
    dec.close()


def test_prefetch_that_is_never_used_is_throttled(model, context, tmp_path) -> None:
    """Every block resident: predictions can never be used, so after one window the predictor is
    switched off for THROTTLE_OFF windows (and outputs are the same either way)."""
    from lm import longdecode

    n = 1600 // 32
    dec = LongDecoder(model, BlockSparse(topk=3), TierSpec(n, n, 0, 32, prefetch=True), disk_dir=tmp_path)
    dec.prefill(context.tokens)
    for name in list(context.values) * 3:
        answer_tokens(dec, context.query(name))
    assert len(dec.stalls) > longdecode.THROTTLE_WINDOW
    assert dec.throttled_steps == longdecode.THROTTLE_OFF * longdecode.THROTTLE_WINDOW
    assert dec.tiers.stats.prefetch_used == 0
    dec.close()
