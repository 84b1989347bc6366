"""Paged KV cache: one pool of fixed-size blocks shared by all layers, an allocator, block copy.

Layout: one block-major pool ``[num_blocks, L, 2, block_size, H, D]`` (axis 2: 0 = K, 1 = V, the
layout of ``accel.kv``: a block's keys and values of every layer are contiguous, so a block copy is
one memmove); ``k`` and ``v`` are its ``[L, num_blocks, block_size, H, D]`` views (strided, not
contiguous).  A block id names the same block in every layer, for K and V.  A sequence owns a
*block table* (a list of block ids); the key/value of its token at position ``p`` lives at flat
slot ``table[p // block_size] * block_size + p % block_size``, i.e. ``k[:, slot // block_size,
slot % block_size]`` (:meth:`PagedKVCache.split`).

Blocks are reference-counted so that forks (beam hypotheses, a splice in progress) share their
common prefix; a writer copies a shared block first (copy-on-write, :func:`copy_blocks`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import torch

from accel import kv as _accel_kv  # the GPU core's block-copy op (CUDA kernel, NumPy reference on the host)
from lm.errors import BlockAllocatorError, OutOfBlocksError


class BlockAllocator:
    """Free list plus reference counts over ``num_blocks`` block ids.

    Invariant: a block id is in the free list exactly once iff its reference count is 0; every
    other block has a positive count equal to the number of block-table entries naming it.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        self._check_id(block)
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with count 1; raises :class:`OutOfBlocksError` (allocating none)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def incref(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        for b in blocks:
            self._check_id(b)
            if self._refs[b] == 0:
                raise BlockAllocatorError(f"incref of free block {b}")
        for b in blocks:
            self._refs[b] += 1

    def decref(self, blocks: Iterable[int]) -> None:
        """Drop one reference per entry; blocks reaching 0 go back to the free list.

        Checked as a whole first: a list that would drive any count below 0 changes nothing.
        """
        blocks = list(blocks)
        drops = collections.Counter(blocks)
        for b, n in drops.items():
            self._check_id(b)
            if self._refs[b] < n:
                raise BlockAllocatorError(f"block {b} freed {n} times with {self._refs[b]} references")
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def check(self, tables: Iterable[Sequence[int]]) -> None:
        """Raise :class:`BlockAllocatorError` unless the invariant holds for these block tables."""
        expected = collections.Counter(b for table in tables for b in table)
        free = list(self._free)
        if len(free) != len(set(free)):
            raise BlockAllocatorError("a block is on the free list twice")
        for b in range(self.num_blocks):
            if self._refs[b] != expected.get(b, 0):
                raise BlockAllocatorError(
                    f"block {b}: refcount {self._refs[b]} but {expected.get(b, 0)} table entries"
                )
            if (self._refs[b] == 0) != (b in set(free)):
                raise BlockAllocatorError(f"block {b}: free-list membership disagrees with refcount")

    def _check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise BlockAllocatorError(f"block id {block} outside [0, {self.num_blocks})")


def copy_blocks(pool: torch.Tensor, mapping: Mapping[int, int] | Sequence[tuple[int, int]]) -> None:
    """Copy whole blocks ``src -> dst`` of ``pool`` ``[num_blocks, L, 2, bs, H, D]`` (K and V of
    every layer at once).

    Contract (the one of ``accel.kv.copy_blocks``): ids in range, no destination twice, no block
    both a source and a destination; a bad mapping raises ``ValueError`` before anything is
    written.  Uses ``accel.kv`` (the CUDA kernel on a GPU, its NumPy reference on the host) when
    the pool is on the CPU or a CUDA device, else the torch ``index_copy_`` path below.
    """
    pairs = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
    if not pairs:
        return
    src = [int(s) for s, _ in pairs]
    dst = [int(d) for _, d in pairs]
    if pool.device.type == "cpu":
        _accel_kv.copy_blocks(pool.numpy(), src, dst, backend="reference")
        return
    if pool.device.type == "cuda":  # pragma: no cover - needs a GPU
        import cupy

        _accel_kv.copy_blocks(cupy.asarray(pool), src, dst)
        return
    n = pool.shape[0]
    if any(not 0 <= b < n for b in src + dst):
        raise ValueError(f"block ids must lie in [0, {n})")
    if len(set(dst)) != len(dst):
        raise ValueError("a destination block appears twice in the mapping")
    if set(src) & set(dst):
        raise ValueError("a block is both a source and a destination")
    idx_src = torch.tensor(src, dtype=torch.long, device=pool.device)
    idx_dst = torch.tensor(dst, dtype=torch.long, device=pool.device)
    pool.index_copy_(0, idx_dst, pool.index_select(0, idx_src))


class PagedKVCache:
    """The K and V pools plus their allocator."""

    def __init__(
        self,
        *,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, n_layers, 2, block_size, n_heads, head_dim)
        self.pool = torch.zeros(shape, dtype=dtype, device=device)
        self.k = self.pool[:, :, 0].transpose(0, 1)  # [L, num_blocks, block_size, H, D] view
        self.v = self.pool[:, :, 1].transpose(0, 1)
        self.allocator = BlockAllocator(num_blocks)

    def split(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) index tensors of flat slots: ``k[:, block, offset]`` is slot ``slots``."""
        return torch.div(slots, self.block_size, rounding_mode="floor"), slots % self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def slots(self, table: Sequence[int], positions: Iterable[int]) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def copy_blocks(self, mapping: Mapping[int, int] | Sequence[tuple[int, int]]) -> None:
        copy_blocks(self.pool, mapping)

    def gather(self, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L, length, H, D]`` of a sequence, read through its block table."""
        b, o = self.split(torch.tensor(self.slots(table, range(length)), dtype=torch.long, device=self.k.device))
        return self.k[:, b, o], self.v[:, b, o]
