"""Two more long-context peers tried on kvtp's task (seed 004 C-3, C-4), small and trained briefly
by ``bench seed004``'s ``hyena`` section; see docs/seeds.md for what they reached.

* :class:`HyenaLM` (C-3, Poli et al. 2023): each block's mixer is the order-2 Hyena recurrence
  ``z = v; z = x1 * (h1 * z); z = x2 * (h2 * z)`` with *implicit* long filters ``h`` (a small MLP
  of sinusoidal position features, times an exponential decay window) applied as causal
  convolutions by FFT, and a short depthwise convolution on the projections.
* :class:`MegaByteLM` (C-4, Yu et al. 2023): tokens grouped in patches of ``patch``; a global
  causal transformer over patch embeddings (shifted one patch, so a patch sees only earlier
  ones) and a local causal transformer inside each patch, fed the global output.

Both take ``[B, T]`` ids and return ``[B, T, V]`` logits, with the token shift of
:class:`lm.longmodel.LongLM` on the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _fft_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal convolution of ``u`` ``[B, d, T]`` with filters ``h`` ``[d, T]``."""
    T = u.shape[-1]
    n = 2 * T
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h, n=n), n=n)
    return y[..., :T]


class HyenaFilter(nn.Module):
    def __init__(self, d: int, emb: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.emb = emb
        self.mlp = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU(), nn.Linear(hidden, d))
        self.decay = nn.Parameter(torch.linspace(-6.0, -2.0, d))  # log rate per channel

    def forward(self, T: int) -> torch.Tensor:
        t = torch.arange(T, dtype=torch.float32)[:, None]
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(self.emb // 2) / (self.emb // 2))
        feats = torch.cat((torch.sin(t * freqs), torch.cos(t * freqs)), dim=1)
        h = self.mlp(feats).T  # [d, T]
        h = h * torch.exp(-torch.exp(self.decay)[:, None] * t.T)
        return h / (h.abs().sum(-1, keepdim=True) + 1.0)  # bounded gain whatever the length


class HyenaBlock(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.proj = nn.Linear(d, 3 * d)
        self.short = nn.Conv1d(3 * d, 3 * d, 3, padding=2, groups=3 * d)
        self.h1, self.h2 = HyenaFilter(d), HyenaFilter(d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        p = self.short(self.proj(self.ln1(x)).transpose(1, 2))[..., :T]
        v, x1, x2 = p.chunk(3, dim=1)
        z = x1 * _fft_conv(v, self.h1(T))
        z = x2 * _fft_conv(z, self.h2(T))
        x = x + self.out(z.transpose(1, 2))
        return x + self.mlp(self.ln2(x))


class HyenaLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, n_layers: int = 2, d_ff: int = 192) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=0.02)  # tied head: small logits at the start
        self.prev = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.prev.weight)
        self.blocks = nn.ModuleList(HyenaBlock(d, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.prev(self.emb(F.pad(idx[:, :-1], (1, 0))))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.emb.weight.T


class MegaByteLM(nn.Module):
    def __init__(
        self, vocab: int, d: int = 64, patch: int = 8, n_global: int = 1, n_local: int = 1, heads: int = 4
    ) -> None:
        super().__init__()
        self.patch = patch
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=0.02)  # tied head: small logits at the start
        self.prev = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.prev.weight)
        self.patch_in = nn.Linear(patch * d, d)
        self.start = nn.Parameter(torch.zeros(d))
        layer = lambda: nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)  # noqa: E731
        self.glob = nn.ModuleList(layer() for _ in range(n_global))
        self.loc = nn.ModuleList(layer() for _ in range(n_local))
        self.patch_out = nn.Linear(d, patch * d)
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        P = self.patch
        pad = (-T) % P
        ids = F.pad(idx, (0, pad))
        n = ids.shape[1] // P
        x = self.emb(ids) + self.prev(self.emb(F.pad(ids[:, :-1], (1, 0))))  # [B, nP, d]
        d = x.shape[-1]
        patches = self.patch_in(x.view(B, n, P * d))
        g = torch.cat((self.start.expand(B, 1, d), patches[:, :-1]), dim=1)  # patch i sees patches < i
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        for blk in self.glob:
            g = blk(g, src_mask=mask, is_causal=True)
        local = x.view(B * n, P, d) + self.patch_out(g).view(B * n, P, d)
        lmask = nn.Transformer.generate_square_subsequent_mask(P)
        for blk in self.loc:
            local = blk(local, src_mask=lmask, is_causal=True)
        out = self.ln_f(local.view(B, n * P, d))[:, :T]
        return out @ self.emb.weight.T
