"""Attention policies over a tiered KV cache: which blocks a decode step reads, and how.

A policy answers, for one layer of one step, the ordered list of logical blocks the query
attends to (:meth:`Policy.select`) and the chunk size in which they are streamed through the
device arena.  :func:`attend` computes the attention over those blocks chunk by chunk with an
online softmax (the log-sum-exp merge of FlashAttention): a chunk is acquired (made resident
and pinned), gathered, folded in and released, so the device never needs more than one chunk
at once.  The arithmetic depends only on the chunks' contents and order, never on which slots
or tiers they came from: tiering cannot change an output (tested token for token).

* :class:`FullAttention` — every block, in order, ``chunk_blocks`` at a time: exact attention,
  bandwidth-bound when the arena is smaller than the context (every step streams the context).
* :class:`BlockSparse` — the approach of Quest (Tang et al. 2024) with InfLLM's fixed parts: the
  first ``sinks`` blocks (attention sinks), the last ``window`` blocks (the recent window, which
  holds the current token) and the ``topk`` other blocks whose *key summary* bounds the query's
  attention logit highest.  A block's summary is the element-wise min and max of its keys per
  layer and head; ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` is an upper bound of ``q . k`` over
  the block, and a block scores the maximum bound over heads.  Summaries stay on the device
  (2 vectors per head per layer per block: 1/32 of a 64-token block).

* :class:`TopKKeys` — per-query top-k keys (seed 004, C-5): per head, the ``k_top`` keys of
  highest ``q . k`` over the whole context, and attention over those keys only (softmax over the
  chosen keys).  Exact selection needs every key: each step streams all key blocks through the
  arena ``chunk_blocks`` at a time to score them, then reads the values of the blocks holding a
  chosen key.  ``k_top`` must not exceed the context's keys (:class:`TopKError`, a
  ``ValueError``), checked before a decoder takes the context.  :func:`topk_sparse_attention` is
  the same rule on dense tensors (the origin's function).

The working set of one step (what must fit the arena at once) is ``chunk_blocks`` for the full
and top-k policies and ``sinks + window + topk`` for the block-sparse one; a smaller arena is
refused (:class:`lm.kvtiers.BudgetTooSmallError`) before the first step.  ``bench seed004``
(section ``topk``) compares the blocks each policy reads per layer and step at equal budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lm.errors import LMError
from lm.kvtiers import TieredKV


class TopKError(LMError, ValueError):
    """``k_top`` is not a positive integer, or exceeds the number of keys it selects from."""


class Policy:
    name = "policy"
    chunk_blocks = 1
    #: Whether the decoder's prefetcher may predict this policy's next selection (it calls
    #: ``select`` for a look-ahead query; a policy that reads every block has nothing to predict).
    predictable = True
    #: Seconds the last ``select`` stalled on block moves (a policy that reads keys to select).
    select_stall = 0.0

    def working_set(self) -> int:
        return self.chunk_blocks

    def check_context(self, n_tokens: int) -> None:
        """Raise before a decoder takes an ``n_tokens`` context the policy cannot serve."""

    def select(self, layer: int, q: np.ndarray, tiers: TieredKV) -> list[int]:
        raise NotImplementedError

    def keep(self, blocks: Sequence[int], tiers: TieredKV) -> torch.Tensor | None:
        """Per head, which keys of ``blocks`` (``[H, len(blocks) * block_size]``, in order) the
        last ``select`` chose; None: every key of the blocks."""
        return None

    def describe(self) -> dict:
        return {"policy": self.name, "chunk_blocks": self.chunk_blocks}


class FullAttention(Policy):
    name = "full"
    predictable = False

    def __init__(self, chunk_blocks: int = 32):
        if not isinstance(chunk_blocks, int) or chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be a positive integer, got {chunk_blocks!r}")
        self.chunk_blocks = chunk_blocks

    def select(self, layer: int, q: np.ndarray, tiers: TieredKV) -> list[int]:
        return list(range(tiers.num_blocks))


class BlockSparse(Policy):
    name = "sparse"

    def __init__(self, topk: int = 8, sinks: int = 1, window: int = 2):
        for key, value, lo in (("topk", topk, 0), ("sinks", sinks, 0), ("window", window, 1)):
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"{key} must be an integer >= {lo}, got {value!r}")
        self.topk, self.sinks, self.window = topk, sinks, window
        self.chunk_blocks = topk + sinks + window

    def select(self, layer: int, q: np.ndarray, tiers: TieredKV) -> list[int]:
        n = tiers.num_blocks
        if n <= self.chunk_blocks:
            return list(range(n))
        fixed = set(range(self.sinks)) | set(range(n - self.window, n))
        lo, hi = self.sinks, n - self.window  # candidates: the blocks in between
        kmin, kmax = tiers.kmin[layer, lo:hi], tiers.kmax[layer, lo:hi]  # [m, H, D]
        bound = np.maximum(q * kmin, q * kmax).sum(-1).max(-1)  # [m]
        top = np.argsort(-bound, kind="stable")[: self.topk] + lo
        return sorted(fixed | {int(b) for b in top})

    def describe(self) -> dict:
        return {"policy": self.name, "topk": self.topk, "sinks": self.sinks, "window": self.window}


class TopKKeys(Policy):
    """Per-query top-k keys; see the module docstring."""

    name = "topk_keys"
    predictable = False

    def __init__(self, k_top: int = 256, chunk_blocks: int = 16):
        for key, value in (("k_top", k_top), ("chunk_blocks", chunk_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TopKError(f"{key} must be a positive integer, got {value!r}")
        self.k_top, self.chunk_blocks = k_top, chunk_blocks
        self._chosen: torch.Tensor | None = None  # [H, k_top] positions chosen by the last select
        #: Blocks read by the last select (every key block) and by its attend (value blocks).
        self.touched = 0
        self.value_blocks = 0

    def check_context(self, n_tokens: int) -> None:
        if self.k_top > n_tokens:
            raise TopKError(f"k_top {self.k_top} exceeds the context's {n_tokens} keys")

    def select(self, layer: int, q: np.ndarray, tiers: TieredKV) -> list[int]:
        n, bs, n_tok = tiers.num_blocks, tiers.block_size, tiers.n_tokens
        self.check_context(n_tok)
        H, D = q.shape
        qt = torch.from_numpy(np.ascontiguousarray(q))
        scores = []
        self.select_stall = 0.0
        for lo in range(0, n, self.chunk_blocks):  # score every key, a chunk at a time
            part = list(range(lo, min(n, lo + self.chunk_blocks)))
            self.select_stall += tiers.acquire(part)
            try:
                k = torch.from_numpy(tiers.device[tiers.slots(part), layer, 0]).reshape(-1, H, D)
            finally:
                tiers.release(part)
            scores.append(torch.einsum("hd,nhd->hn", qt, k))
        sc = torch.cat(scores, -1)[:, :n_tok]
        self._chosen = torch.topk(sc, self.k_top, dim=-1, sorted=False).indices  # [H, k_top]
        blocks = sorted({int(b) for b in torch.unique(self._chosen // bs)})
        self.value_blocks = len(blocks)
        self.touched = n
        return blocks

    def keep(self, blocks: Sequence[int], tiers: TieredKV) -> torch.Tensor | None:
        assert self._chosen is not None, "select first"
        bs = tiers.block_size
        index = torch.full((tiers.num_blocks,), -1, dtype=torch.long)
        index[torch.tensor(list(blocks))] = torch.arange(len(blocks))
        col = index[self._chosen // bs] * bs + self._chosen % bs  # [H, k_top] columns in blocks
        mask = torch.zeros(self._chosen.shape[0], len(blocks) * bs, dtype=torch.bool)
        return mask.scatter_(1, col, True)

    def describe(self) -> dict:
        return {"policy": self.name, "k_top": self.k_top, "chunk_blocks": self.chunk_blocks}


def topk_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_top: int) -> torch.Tensor:
    """Attention of ``q`` ``[..., T, D]`` over its ``k_top`` highest-scoring keys of ``k``
    ``[..., S, D]`` (values ``v`` ``[..., S, Dv]``), per query; ``k_top > S`` is a
    :class:`TopKError`.  (The origin's ``topk_sparse_attention``, no mask: callers that need
    causality select among the keys a query may see, as :class:`TopKKeys` does.)"""
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim() or k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        raise TopKError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top < 1:
        raise TopKError(f"k_top must be a positive integer, got {k_top!r}")
    if k_top > k.shape[-2]:
        raise TopKError(f"k_top {k_top} exceeds seq_k {k.shape[-2]}")
    sc = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    top = sc.topk(k_top, dim=-1).values[..., -1:]  # the k-th score per query
    sc = sc.masked_fill(sc < top, -math.inf)  # ties at the k-th score are all kept
    return torch.softmax(sc, -1) @ v


def attend(q: torch.Tensor, blocks: Sequence[int], tiers: TieredKV, layer: int, chunk: int,
           *, on_chunk: Callable[[int], None] | None = None,
           keep: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Attention output ``[H, D]`` of query ``q`` ``[H, D]`` over the keys of ``blocks`` (in this
    order), streamed ``chunk`` blocks at a time through the device arena; also the seconds the
    caller stalled on block moves.  ``on_chunk(i)`` is called after chunk ``i`` is acquired
    (a streaming prefetcher uses it to request chunk ``i + 1``) once chunk ``i`` is pinned.
    ``keep`` ``[H, len(blocks) * block_size]``: per head, the keys attended (default: all);
    a head must keep at least one key."""
    H, D = q.shape
    bs, n_tok = tiers.block_size, tiers.n_tokens
    scale = 1.0 / math.sqrt(D)
    m = torch.full((H,), -math.inf)
    s = torch.zeros(H)
    acc = torch.zeros(H, D)
    stall = 0.0
    for i, lo in enumerate(range(0, len(blocks), chunk)):
        part = list(blocks[lo:lo + chunk])
        stall += tiers.acquire(part)
        if on_chunk is not None:
            on_chunk(i)
        try:
            slots = tiers.slots(part)
            k = torch.from_numpy(tiers.device[slots, layer, 0]).reshape(-1, H, D)
            v = torch.from_numpy(tiers.device[slots, layer, 1]).reshape(-1, H, D)
        finally:
            tiers.release(part)
        sc = torch.einsum("hd,nhd->hn", q, k) * scale
        if keep is not None:
            sc = sc.masked_fill(~keep[:, lo * bs:(lo + len(part)) * bs], -math.inf)
        if (part[-1] + 1) * bs > n_tok:  # the partly written tail block (always last)
            pos = (torch.tensor(part)[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)
            sc = sc.masked_fill(pos[None, :] >= n_tok, -math.inf)
        m_new = torch.maximum(m, sc.max(-1).values)
        shift = m_new
        if keep is not None:  # a head may have no kept key yet: exp(-inf - -inf) would be NaN
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(sc - shift[:, None])
        corr = torch.exp(m - shift)
        s = s * corr + p.sum(-1)
        acc = acc * corr[:, None] + torch.einsum("hn,nhd->hd", p, v)
        m = m_new
    return acc / s[:, None], stall
