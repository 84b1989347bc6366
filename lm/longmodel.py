"""The long-context model: a tiny pre-LN transformer whose positions run to 128k tokens and beyond.

Position scheme (chosen so a model trained on contexts of about a thousand tokens still works at
32k-128k):

* **Partial rotary.** Only the first ``rope_dims`` of each head's dimensions are rotated (RoPE,
  as GPT-NeoX's ``rotary_pct``); the rest carry no position at all (NoPE).  Local structure
  ("the second digit after ``k=``") uses the rotated part; retrieval by content ("the definition
  of ``k``") can use the unrotated part, whose dot products do not depend on distance.
* **Log-length query scaling** (``logn_len``): a query at position ``p`` is multiplied by
  ``max(1, log(p + 1) / log(logn_len))``, which keeps the attention to a matching key as sharp at
  ``p = 128k`` as at the training lengths, where softmax over more keys would otherwise dilute
  it (the "log-n" scaling of Chiang & Cholak 2022 / Qwen).  Inside the training lengths it is 1,
  so training does not see it.

**Token shift** (``prev_mix``): each position's input is its token's embedding plus a learned
linear map of the *previous* token's embedding (the "smear" / token shift of RWKV and of the
modded-nanoGPT runs).  A value token then carries the name written before it, so recalling
``k``'s value is a single content match: the induction pattern without a previous-token head,
which a tiny model learns in minutes.  It is local, so it says nothing about length.

Two paths share every weight: :meth:`LongLM.forward` (dense causal attention: training and the
prefill, ``return_kv`` hands back each layer's keys and values) and the per-token pieces a decoder
drives one layer at a time (:meth:`embed`, :meth:`qkv`, :meth:`finish`, :meth:`head`), so that
*where* the keys and values live (a tiered cache) and *which* of them a step attends to (a policy)
stay outside the model.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from lm.attention import attention

DEFAULT_WEIGHTS = pathlib.Path(__file__).parent / "weights" / "varref.pt"


@dataclasses.dataclass(frozen=True)
class LongConfig:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    rope_dims: int = 8
    rope_base: float = 10000.0
    logn_len: int = 1024
    prev_mix: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def partial_rope(x: torch.Tensor, pos: torch.Tensor, dims: int, base: float) -> torch.Tensor:
    """Rotate the first ``dims`` dimensions of ``x`` ``[T, H, D]`` by positions ``pos`` ``[T]``."""
    if dims == 0:
        return x
    rot, rest = x[..., :dims], x[..., dims:]
    inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    ang = (pos.to(torch.float64)[:, None] * inv_freq).to(x.dtype)  # [T, dims/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)


def logn_factor(pos: torch.Tensor, logn_len: int) -> torch.Tensor:
    """``[T]`` query multipliers (1 inside ``logn_len``)."""
    if logn_len <= 1:
        return torch.ones_like(pos, dtype=torch.float32)
    return torch.clamp(torch.log(pos.to(torch.float64) + 1) / math.log(logn_len), min=1.0).to(torch.float32)


class LongBlock(nn.Module):
    def __init__(self, cfg: LongConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)


class LongLM(nn.Module):
    """Token ids -> next-token logits.  Operators (the unit :mod:`lm.popb` probes and masks):
    ``attn`` (qkv + proj), ``mlp`` (fc1 + fc2), ``ln`` (the layer norms) of each layer."""

    def __init__(self, cfg: LongConfig):
        super().__init__()
        if cfg.rope_dims % 2 or not 0 <= cfg.rope_dims <= cfg.head_dim:
            raise ValueError(f"rope_dims must be even and in [0, head_dim], got {cfg.rope_dims}")
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prev = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.prev_mix else None
        if self.prev is not None:
            nn.init.zeros_(self.prev.weight)
        self.blocks = nn.ModuleList(LongBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.emb.weight, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
            nn.init.normal_(blk.fc2.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    # ---------------------------------------------------------------- per-token pieces

    def embed(self, idx: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors of tokens ``idx`` whose predecessors are ``prev`` (PAD before the first)."""
        x = self.emb(idx)
        if self.prev is not None:
            x = x + self.prev(self.emb(prev if prev is not None else torch.zeros_like(idx)))
        return x

    def qkv(self, layer: int, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (rotated and log-n scaled), keys (rotated), values ``[T, H, D]`` of ``x`` ``[T, d]``."""
        cfg, blk = self.cfg, self.blocks[layer]
        q, k, v = blk.qkv(blk.ln1(x)).view(x.shape[0], 3, cfg.n_heads, cfg.head_dim).unbind(1)
        q = partial_rope(q, pos, cfg.rope_dims, cfg.rope_base) * logn_factor(pos, cfg.logn_len)[:, None, None]
        return q, partial_rope(k, pos, cfg.rope_dims, cfg.rope_base), v

    def finish(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual update of ``x`` ``[T, d]`` from the attention output ``attn`` ``[T, H, D]``."""
        blk = self.blocks[layer]
        x = x + blk.proj(attn.reshape(x.shape[0], -1))
        return x + blk.fc2(F.gelu(blk.fc1(blk.ln2(x))))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x) @ self.emb.weight.T

    # ---------------------------------------------------------------- dense path

    def forward(self, idx: torch.Tensor, *, return_kv: bool = False):
        """Logits ``[B, T, V]`` of ``idx`` ``[B, T]`` (positions ``0..T-1``); with ``return_kv``
        (``B == 1``) also keys and values ``[L, T, H, D]`` of every layer."""
        B, T = idx.shape
        pos = torch.arange(T)
        x = self.embed(idx, F.pad(idx[:, :-1], (1, 0)))
        keys, vals = [], []
        for layer in range(self.cfg.n_layers):
            q, k, v = self.qkv(layer, x.reshape(B * T, -1), pos.repeat(B))
            q, k, v = (t.view(B, T, self.cfg.n_heads, -1).transpose(1, 2) for t in (q, k, v))
            attn = attention(q, k, v, causal=True)
            if return_kv:
                keys.append(k[0].transpose(0, 1))
                vals.append(v[0].transpose(0, 1))
            x = self.finish(layer, x.reshape(B * T, -1), attn.transpose(1, 2)).view(B, T, -1)
        logits = self.head(x)
        if return_kv:
            return logits, torch.stack(keys), torch.stack(vals)
        return logits


def save(model: LongLM, path: pathlib.Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(model.cfg), "state_dict": model.state_dict(), "meta": meta}, path)


def load(path: pathlib.Path | str = DEFAULT_WEIGHTS) -> LongLM:
    """The trained model (float32), in eval mode with gradients off."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = LongLM(LongConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)


def load_meta(path: pathlib.Path | str = DEFAULT_WEIGHTS) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]
