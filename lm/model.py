"""A small decoder-only transformer (pre-LN, rotary positions, tied embeddings).

Two forward paths share every weight:

* :meth:`TinyLM.forward` — full causal self-attention over a dense batch (training, reference);
* :meth:`TinyLM.forward_paged` — the engine's path: keys and values of the new tokens are written
  into a paged KV pool at given *slots*, and attention reads every earlier key/value back through
  the sequence's block table (a gather), so the model never sees a contiguous per-sequence cache.

Rotary embeddings make a position shift a rotation of the cached keys
(``rope(rope(k, p), d) == rope(k, p + d)`` up to rounding), which the approximate splice mode uses.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.attention import attention


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, H, D]`` by positions ``pos`` (broadcastable to ``[..., T]``)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    ang = pos.to(x.dtype)[..., None] * inv_freq  # [..., T, D/2]
    cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]  # broadcast over heads
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def qkv_rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys (both rotated) and values ``[B, T, H, D]`` of ``x`` ``[B, T, d]``."""
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.cfg.n_heads, self.cfg.head_dim).unbind(2)
        return rope(q, pos, self.cfg.rope_base), rope(k, pos, self.cfg.rope_base), v

    def attn_bias(self, qpos: torch.Tensor, S: int) -> torch.Tensor | None:
        """An additive attention bias ``[B|1, H, T, S]`` for queries at ``qpos`` ``[B|1, T]`` over
        keys ``0..S-1`` (a subclass's position bias, e.g. :class:`spark.procedural.SparkBlock`'s);
        None here."""
        return None

    def finish(self, x: torch.Tensor, attn: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Residual update of ``x`` from the attention output ``attn`` ``[B, H, T, D]`` (``idx``:
        the tokens, for a subclass whose MLP routes by token)."""
        B, T, _ = x.shape
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.emb.weight, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(blk.fc2.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x) @ self.emb.weight.T

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of a dense batch ``idx`` ``[B, T]`` (positions ``0..T-1``)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.emb(idx)
        for blk in self.blocks:
            q, k, v = blk.qkv_rope(x, pos)
            bias = blk.attn_bias(pos[None], T)
            attn = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, bias=bias)
            x = blk.finish(x, attn, idx)
        return self.logits(x)

    @torch.no_grad()
    def forward_paged(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        write_slots: torch.Tensor,
        read_slots: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` for new tokens, reading and writing the paged KV pool.

        ``idx``/``pos``/``write_slots``: ``[B, T]`` token ids, their positions and the flat pool
        slots their keys/values are written to.  ``read_slots``: ``[B, S]`` flat slots of key
        positions ``0..S-1`` of each sequence (gathered through its block table); key ``j`` is
        visible to query ``t`` iff ``j <= pos[b, t]``, so slots past a sequence's length are never
        read.  ``k_pool``/``v_pool``: ``[L, num_blocks, block_size, H, D]`` views of the paged
        pool (:class:`lm.kvcache.PagedKVCache` ``k``/``v``), modified in place; flat slot ``s`` is
        ``[:, s // block_size, s % block_size]``.
        """
        B, T = idx.shape
        S = read_slots.shape[1]
        bs = k_pool.shape[2]
        mask = torch.arange(S, device=idx.device)[None, None, :] <= pos[:, :, None]  # [B,T,S]
        mask = mask[:, None]  # [B,1,T,S]
        flat_write = write_slots.reshape(-1)
        wb, wo = torch.div(flat_write, bs, rounding_mode="floor"), flat_write % bs
        rb, ro = torch.div(read_slots, bs, rounding_mode="floor"), read_slots % bs
        x = self.emb(idx)
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk.qkv_rope(x, pos)
            k_pool[layer][wb, wo] = k.reshape(B * T, *k.shape[2:])
            v_pool[layer][wb, wo] = v.reshape(B * T, *v.shape[2:])
            keys = k_pool[layer][rb, ro]  # [B, S, H, D]
            vals = v_pool[layer][rb, ro]
            bias = blk.attn_bias(pos, S)
            attn = attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), mask=mask, bias=bias)
            x = blk.finish(x, attn, idx)
        return self.logits(x)
