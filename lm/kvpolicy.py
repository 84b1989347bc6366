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

The working set of one step (what must fit the arena at once) is ``chunk_blocks`` for the full
policy and ``sinks + window + topk`` for the block-sparse one; a smaller arena is refused
(:class:`lm.kvtiers.BudgetTooSmallError`) before the first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from lm.kvtiers import TieredKV


class Policy:
    name = "policy"
    chunk_blocks = 1

    def working_set(self) -> int:
        return self.chunk_blocks

    def select(self, layer: int, q: np.ndarray, tiers: TieredKV) -> list[int]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"policy": self.name, "chunk_blocks": self.chunk_blocks}


class FullAttention(Policy):
    name = "full"

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


def attend(q: torch.Tensor, blocks: Sequence[int], tiers: TieredKV, layer: int, chunk: int,
           *, on_chunk: Callable[[int], None] | None = None) -> tuple[torch.Tensor, float]:
    """Attention output ``[H, D]`` of query ``q`` ``[H, D]`` over the keys of ``blocks`` (in this
    order), streamed ``chunk`` blocks at a time through the device arena; also the seconds the
    caller stalled on block moves.  ``on_chunk(i)`` is called after chunk ``i`` is acquired
    (a streaming prefetcher uses it to request chunk ``i + 1``) once chunk ``i`` is pinned."""
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
        if (part[-1] + 1) * bs > n_tok:  # the partly written tail block (always last)
            pos = (torch.tensor(part)[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)
            sc = sc.masked_fill(pos[None, :] >= n_tok, -math.inf)
        m_new = torch.maximum(m, sc.max(-1).values)
        p = torch.exp(sc - m_new[:, None])
        corr = torch.exp(m - m_new)
        s = s * corr + p.sum(-1)
        acc = acc * corr[:, None] + torch.einsum("hn,nhd->hd", p, v)
        m = m_new
    return acc / s[:, None], stall
