"""KVT-P's cold tier (seed 004 C-7 (a)): distant KV blocks kept compressed, found again by search.

Blocks of the prefill that are neither the sink block nor in the recent window go *cold*: each
layer's keys and values of a token (``[H, D]`` each, concatenated) are encoded by a small
:class:`lm.vectorstore.Autoencoder` (trained on a :class:`lm.vectorstore.Reservoir` sample of a
*training* context's keys and values, never the context decoded) into float16 codes, and the
block's mean key (all heads concatenated) is put in a per-layer :class:`lm.vectorstore.VectorStore`
(inner product).  A decode step's query (heads concatenated) searches that store for the top
``k`` blocks, which are decoded from their codes and attended beside the sink block and the exact
recent tokens.  Bytes kept per cold token: two codes' float16 instead of ``2 x H x D`` float32.

:class:`ColdTierDecoder` drives :class:`lm.longmodel.LongLM` one token at a time through its
per-token pieces (``embed``, ``qkv``, ``finish``, ``head``), as :class:`lm.longdecode.LongDecoder`
does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lm import varref
from lm.longmodel import LongLM
from lm.vectorstore import Autoencoder, Reservoir, VectorStore


def train_codecs(
    model: LongLM, tokens: Sequence[int], code_dim: int, *, capacity: int = 4096, steps: int = 200, seed: int = 0
) -> list[Autoencoder]:
    """One autoencoder per layer for ``[k | v]`` rows (``2 d_model`` wide), on a reservoir of the
    rows of ``tokens`` (a training context)."""
    with torch.no_grad():
        _, keys, vals = model(torch.tensor([list(tokens)]), return_kv=True)
    L, T = keys.shape[:2]
    codecs = []
    for layer in range(L):
        rows = torch.cat((keys[layer].reshape(T, -1), vals[layer].reshape(T, -1)), dim=1).numpy()
        res = Reservoir(capacity, rows.shape[1], seed=seed + layer)
        res.add(rows)
        ae = Autoencoder(rows.shape[1], code_dim, seed=seed + layer)
        ae.fit(res.sample(), steps=steps, seed=seed + layer)
        codecs.append(ae)
    return codecs


class ColdTierDecoder:
    """One sequence: sink block and recent window exact, the rest compressed and searched.

    Invariant: every position ``< n_prefill`` is in exactly one of sink (``< block``), cold
    (``block <= p < cold_end``) or hot (``>= cold_end``); decoded tokens are hot."""

    def __init__(
        self, model: LongLM, codecs: list[Autoencoder], *, block: int = 64, window: int = 128, topk: int = 2
    ) -> None:
        if block < 1 or window < 1 or topk < 1:
            raise ValueError("block, window and topk must be positive")
        self.model, self.codecs = model, codecs
        self.block, self.window, self.topk = block, window, topk
        self.cfg = model.cfg

    def load(self, tokens: Sequence[int], keys: torch.Tensor, vals: torch.Tensor) -> None:
        """Take the prefill's keys and values ``[L, T, H, D]``: split them, compress the cold part."""
        ids = varref.check_ids(tokens)
        T, b = len(ids), self.block
        self.cold_end = max(b, ((T - self.window) // b) * b)
        self.n_cold = (self.cold_end - b) // b
        L = self.cfg.n_layers
        self.sink = [(keys[i, :b].clone(), vals[i, :b].clone()) for i in range(L)]
        self.hot_k = [keys[i, self.cold_end :].clone() for i in range(L)]
        self.hot_v = [vals[i, self.cold_end :].clone() for i in range(L)]
        self.codes: list[np.ndarray] = []
        self.stores: list[VectorStore] = []
        hd = self.cfg.n_heads * self.cfg.head_dim
        for i in range(L):
            k = keys[i, b : self.cold_end].reshape(-1, hd)
            v = vals[i, b : self.cold_end].reshape(-1, hd)
            self.codes.append(self.codecs[i].encode(torch.cat((k, v), 1).numpy()) if len(k) else np.zeros((0, 1)))
            store = VectorStore(hd, "ip", use_faiss=False)
            if self.n_cold:
                store.add([str(j) for j in range(self.n_cold)], k.view(self.n_cold, b, hd).mean(1).numpy())
            self.stores.append(store)
        self.pos = T
        self.prev = ids[-1]
        self.last_logits: torch.Tensor | None = None
        self.retrieved = 0

    def cold_bytes(self) -> int:
        """Bytes the cold tier keeps (codes + summaries)."""
        return sum(c.nbytes for c in self.codes) + sum(s.vectors.nbytes for s in self.stores)

    def exact_bytes(self) -> int:
        """Bytes of exact keys and values kept (sink + hot)."""
        n = sum(k.numel() + v.numel() for k, v in self.sink) + sum(k.numel() for k in self.hot_k) * 2
        return n * 4

    def _cold_block(self, layer: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, H, D = self.block, self.cfg.n_heads, self.cfg.head_dim
        rows = self.codecs[layer].decode(self.codes[layer][j * b : (j + 1) * b])
        kv = torch.from_numpy(rows.astype(np.float32))
        return kv[:, : H * D].view(b, H, D), kv[:, H * D :].view(b, H, D)

    def _step(self, tok: int) -> None:
        m = self.model
        pos = torch.tensor([self.pos])
        with torch.no_grad():
            x = m.embed(torch.tensor([tok]), torch.tensor([self.prev]))
            for layer in range(self.cfg.n_layers):
                q, k, v = m.qkv(layer, x, pos)
                self.hot_k[layer] = torch.cat((self.hot_k[layer], k))
                self.hot_v[layer] = torch.cat((self.hot_v[layer], v))
                ks, vs = [self.sink[layer][0]], [self.sink[layer][1]]
                if self.n_cold:
                    hits = self.stores[layer].search(q.reshape(1, -1).numpy(), self.topk)[0]
                    for key, _ in hits:
                        bk, bv = self._cold_block(layer, int(key))
                        ks.append(bk)
                        vs.append(bv)
                        self.retrieved += 1
                ks.append(self.hot_k[layer])
                vs.append(self.hot_v[layer])
                K, V = torch.cat(ks), torch.cat(vs)  # [S, H, D]
                attn = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[:, None], K.transpose(0, 1)[:, None], V.transpose(0, 1)[:, None]
                )  # [H, 1, 1, D]
                x = m.finish(layer, x, attn[:, 0].transpose(0, 1))
            self.last_logits = m.head(x)[0]
        self.pos += 1
        self.prev = tok

    def feed(self, tokens: Sequence[int]) -> None:
        for tok in varref.check_ids(tokens):
            self._step(tok)

    def generate(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            assert self.last_logits is not None
            tok = int(self.last_logits.argmax())
            out.append(tok)
            self._step(tok)
        return out
