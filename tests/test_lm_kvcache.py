"""Paged KV cache: allocator, block copy, and block-table invariants under random engine ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm import tokenizer
from lm.engine import Engine
from lm.errors import (
    BlockAllocatorError,
    LMError,
    OutOfBlocksError,
)
from lm.kvcache import BlockAllocator, PagedKVCache, copy_blocks
from lm.model import ModelConfig, TinyLM


def tiny_engine(num_blocks: int = 24, block_size: int = 4) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.VOCAB_SIZE, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                      max_len=64)
    return Engine(TinyLM(cfg).double(), num_blocks=num_blocks, block_size=block_size)


def test_allocator_allocates_distinct_blocks_and_recycles_them():
    alloc = BlockAllocator(4)
    got = alloc.allocate(3)
    assert len(set(got)) == 3 and alloc.num_free == 1
    alloc.decref(got[:2])
    assert alloc.num_free == 3
    again = alloc.allocate(3)
    assert set(again) == set(range(4)) - {got[2]}
    alloc.check([[got[2]], again])


def test_allocator_refuses_overdraw_without_allocating():
    alloc = BlockAllocator(2)
    alloc.allocate(1)
    with pytest.raises(OutOfBlocksError):
        alloc.allocate(2)
    assert alloc.num_free == 1


def test_allocator_rejects_double_free_atomically():
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(2)
    with pytest.raises(BlockAllocatorError):
        alloc.decref([a, b, b])
    assert alloc.refcount(a) == 1 and alloc.refcount(b) == 1  # nothing was dropped
    alloc.decref([a])
    with pytest.raises(BlockAllocatorError):
        alloc.decref([a])
    with pytest.raises(BlockAllocatorError):
        alloc.incref([a])
    with pytest.raises(BlockAllocatorError):
        alloc.decref([7])


def test_allocator_check_detects_a_leak():
    alloc = BlockAllocator(3)
    alloc.allocate(2)
    with pytest.raises(BlockAllocatorError, match="refcount"):
        alloc.check([[0]])  # block 1 is referenced by no table: leaked


def test_copy_blocks_copies_k_and_v_of_every_layer():
    pool = torch.arange(3 * 2 * 4 * 2 * 1 * 1, dtype=torch.float64).view(4, 3, 2, 2, 1, 1)  # block-major: 4 blocks, 3 layers
    before = pool.clone()
    copy_blocks(pool, {0: 1, 3: 2})
    assert torch.equal(pool[1], before[0])
    assert torch.equal(pool[2], before[3])
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[3], before[3])


@pytest.mark.parametrize("mapping", [{0: 4}, [(0, 1), (2, 1)], {0: 1, 1: 2}])
def test_copy_blocks_rejects_bad_mappings_without_writing(mapping):
    pool = torch.arange(1 * 2 * 4 * 1 * 1 * 1, dtype=torch.float64).view(4, 1, 2, 1, 1, 1)
    before = pool.clone()
    with pytest.raises(ValueError):
        copy_blocks(pool, mapping)
    assert torch.equal(pool, before)


def test_gather_reads_through_the_block_table():
    cache = PagedKVCache(n_layers=1, n_heads=1, head_dim=1, num_blocks=4, block_size=2,
                         dtype=torch.float64)
    cache.k[:] = torch.arange(8, dtype=torch.float64).view(cache.k.shape)
    k, _ = cache.gather([3, 0], 3)  # positions 0,1 in block 3; position 2 in block 0
    assert k.flatten().tolist() == [6.0, 7.0, 0.0]


def test_fork_is_copy_on_write():
    eng = tiny_engine(block_size=4)
    a = eng.start(tokenizer.encode("Q:1+2*3;"))  # 9 tokens: last block partially filled
    kv_before = [t.clone() for t in eng.kv(a)]
    b = eng.fork(a)
    shared = eng.snapshot(a).block_table
    assert eng.snapshot(b).block_table == shared
    eng.step(b)
    assert eng.snapshot(b).block_table[:-1] == shared[:-1]
    assert eng.snapshot(b).block_table[-1] != shared[-1]  # the shared tail was copied
    assert all(torch.equal(x, y) for x, y in zip(eng.kv(a), kv_before))
    eng.check_invariants()


OPS = st.lists(
    st.tuples(st.sampled_from(["start", "step", "fork", "rewind", "free", "splice", "inject",
                               "replace", "beam"]),
               st.integers(0, 1000), st.integers(0, 1000)),
    min_size=1, max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_block_tables_never_leak_or_double_own(ops):
    """After any sequence of operations (including ones that fail for lack of blocks or bad
    spans) every block is owned exactly as many times as live tables name it, and freeing every
    sequence returns every block."""
    eng = tiny_engine(num_blocks=12, block_size=4)
    prompt = tokenizer.encode("Q:1+2*3;")
    for op, x, y in ops:
        live = eng.live_sequences
        sid = live[x % len(live)] if live else None
        try:
            if op == "start" or sid is None:
                eng.start(prompt[: 1 + x % len(prompt)])
            elif op == "step":
                eng.step(sid)
            elif op == "fork":
                eng.fork(sid)
            elif op == "rewind":
                eng.rewind(sid, 1 + y % len(eng.tokens(sid)))
            elif op == "free":
                eng.free(sid)
            elif op == "inject":
                eng.inject(sid, prompt[1 : 1 + y % 6])
            elif op == "beam":
                eng.beam(sid, 1 + y % 3, 1 + x % 4)
            else:
                n = len(eng.tokens(sid))
                start = 1 + y % max(1, n - 1)
                end = min(n, start + 1 + x % 4)
                if op == "splice":
                    eng.splice(sid, start, end, width=1 + x % 3, max_new=1 + y % 5,
                               mode="approx" if y % 2 else "exact", recompute=x % 3)
                else:
                    eng.replace(sid, start, end, prompt[1 : 1 + x % 4])
        except LMError:
            pass  # refused: state must still be consistent, which the check below asserts
        eng.check_invariants()
    for sid in eng.live_sequences:
        eng.free(sid)
    assert eng.cache.allocator.num_free == eng.cache.num_blocks
    eng.check_invariants()
