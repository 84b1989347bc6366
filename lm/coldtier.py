"""KVT-P's cold tier (seed 004 C-7 (a)): distant KV blocks kept compressed, found again by search.

Blocks of the prefill that are neither sink blocks nor in the recent window go *cold*: each
layer's keys and values of a token (``[H, D]`` each, concatenated) are encoded by a small
:class:`lm.vectorstore.Autoencoder` (trained on a :class:`lm.vectorstore.Reservoir` sample of a
*training* context's keys and values, never the context decoded) into float16 codes -- or, with
no codec (``code_dim 0``), kept as float16 rows.  A decode step's query searches a vector store
of block summaries for the top ``k`` blocks, which are decoded and attended beside the sinks and
the exact recent tokens.

Two retrieval keys (``retrieval``):

* ``bound`` (default) -- per layer and head, a :class:`lm.vectorstore.VectorStore` (inner
  product) of ``[kmax | kmin]``, the element-wise max and min of the block's exact keys (taken
  before compression).  For the query ``q`` of that head, ``[max(q, 0) | min(q, 0)] . [kmax |
  kmin] = sum_d max(q_d kmin_d, q_d kmax_d)`` is Quest's upper bound of ``q . k`` over the
  block (:class:`lm.kvpolicy.BlockSparse` scores the same bound), so top-k inner-product search
  per head is exactly Quest's ranking; a block scores its best head (the union of the per-head
  top-k holds the top-k of the max over heads).
* ``mean`` -- the first version: one store per layer of the block's mean key (heads
  concatenated), searched with the query (heads concatenated).  The mean dilutes the one key
  that answers (a definition among 63 filler tokens) and sums heads that do not look for it;
  on kvtp's task it finds the block far less often (docs/seeds.md, section ``memory``).

Bytes kept per cold token: one code (float16) of ``code_dim`` or the float16 ``[k | v]`` row,
plus the block summaries.

:class:`ColdTierDecoder` drives :class:`lm.longmodel.LongLM` one token at a time through its
per-token pieces (``embed``, ``qkv``, ``finish``, ``head``), as :class:`lm.longdecode.LongDecoder`
does, with the same ``prefill`` / ``step`` / ``feed`` / ``generate`` / ``close`` shape, so the
decode worker's ``long_*`` ops serve it (``policy: {name: cold}``, :mod:`lm.longsession`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from lm import varref
from lm.attention import attention
from lm.errors import LMError, SequenceStateError, SpanError
from lm.longmodel import LongLM
from lm.vectorstore import Autoencoder, Reservoir, VectorStore

RETRIEVALS = ("bound", "mean")
#: The training context codecs are fitted on (never a held-out one): seed and length.
CODEC_SEED = varref.TRAIN_SEED + 99
CODEC_CONTEXT = 2048


class ColdTierError(LMError, ValueError):
    """An invalid cold-tier setting (sizes, retrieval key, codec width)."""


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


def default_codecs(model: LongLM, code_dim: int, *, steps: int = 300) -> list[Autoencoder] | None:
    """Codecs fitted on the training context :data:`CODEC_SEED` (None for ``code_dim`` 0: float16
    rows).  Deterministic for a model and width."""
    if isinstance(code_dim, bool) or not isinstance(code_dim, int) or not 0 <= code_dim <= 2 * model.cfg.d_model:
        raise ColdTierError(f"code_dim must be an integer in [0, {2 * model.cfg.d_model}], got {code_dim!r}")
    if code_dim == 0:
        return None
    ctx = varref.make_context(random.Random(CODEC_SEED), CODEC_CONTEXT, 8)
    return train_codecs(model, ctx.tokens, code_dim, steps=steps)


class ColdTierDecoder:
    """One sequence: sink blocks and recent window exact, the rest compressed and searched.

    Invariant: every position ``< n_prefill`` is in exactly one of sink (``< sinks * block``),
    cold (``sinks * block <= p < cold_end``) or hot (``>= cold_end``); decoded tokens are hot.
    ``tokens`` holds every token of the sequence (prefill and decoded)."""

    def __init__(
        self,
        model: LongLM,
        codecs: list[Autoencoder] | None,
        *,
        block: int = 64,
        window: int = 128,
        topk: int = 2,
        sinks: int = 1,
        retrieval: str = "bound",
        exact_rows: int = 0,
    ) -> None:
        for key, value, lo in (
            ("block", block, 1),
            ("window", window, 1),
            ("topk", topk, 1),
            ("sinks", sinks, 0),
            ("exact_rows", exact_rows, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ColdTierError(f"{key} must be an integer >= {lo}, got {value!r}")
        if retrieval not in RETRIEVALS:
            raise ColdTierError(f"retrieval must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
        if codecs is not None and len(codecs) != model.cfg.n_layers:
            raise ColdTierError(f"{len(codecs)} codecs for {model.cfg.n_layers} layers")
        self.model, self.codecs = model, codecs
        self.block, self.window, self.topk, self.sinks = block, window, topk, sinks
        self.retrieval = retrieval
        if exact_rows > block:
            raise ColdTierError(f"exact_rows {exact_rows} exceeds the block's {block} rows")
        self.exact_rows = exact_rows if codecs is not None else 0
        self.cfg = model.cfg
        self.tokens: list[int] = []
        self.last_logits: torch.Tensor | None = None
        self.retrieved = 0
        self.n_cold = 0

    # ------------------------------------------------------------------ prefill

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """The dense causal pass over ``tokens``, then :meth:`load` of its keys and values."""
        ids = varref.check_ids(tokens)
        if not ids:
            raise SpanError("a prompt needs at least one token")
        with torch.no_grad():
            logits, keys, vals = self.model(torch.tensor([ids]), return_kv=True)
        self.load(ids, keys, vals)
        self.last_logits = logits[0, -1]
        return self.last_logits

    def load(self, tokens: Sequence[int], keys: torch.Tensor, vals: torch.Tensor) -> None:
        """Take the prefill's keys and values ``[L, T, H, D]``: split them, compress the cold part."""
        if self.tokens:
            raise SequenceStateError("this decoder already holds a sequence")
        ids = varref.check_ids(tokens)
        T, b, s0 = len(ids), self.block, self.sinks * self.block
        self.cold_end = max(s0, ((T - self.window) // b) * b)
        self.n_cold = (self.cold_end - s0) // b
        L, H, D = self.cfg.n_layers, self.cfg.n_heads, self.cfg.head_dim
        hd = H * D
        self.sink = [(keys[i, :s0].clone(), vals[i, :s0].clone()) for i in range(L)]
        self.hot_k = [keys[i, self.cold_end :].clone() for i in range(L)]
        self.hot_v = [vals[i, self.cold_end :].clone() for i in range(L)]
        self.codes: list[np.ndarray] = []
        #: per layer: cold row index -> the exact float16 row (the block's worst-coded rows)
        self.exceptions: list[dict[int, np.ndarray]] = []
        self.stores: list[list[VectorStore]] = []  # per layer: one store (mean) or one per head (bound)
        names = [str(j) for j in range(self.n_cold)]
        for i in range(L):
            k = keys[i, s0 : self.cold_end]  # [n_cold * b, H, D]
            v = vals[i, s0 : self.cold_end]
            rows = torch.cat((k.reshape(-1, hd), v.reshape(-1, hd)), 1).numpy()
            exc: dict[int, np.ndarray] = {}
            if self.codecs is not None:
                codes = self.codecs[i].encode(rows) if len(rows) else np.zeros((0, 1), np.float16)
                if self.exact_rows and len(rows):
                    err = np.linalg.norm(self.codecs[i].decode(codes) - rows, axis=1).reshape(self.n_cold, b)
                    worst = np.argsort(-err, axis=1, kind="stable")[:, : self.exact_rows]
                    for r in (worst + np.arange(self.n_cold)[:, None] * b).reshape(-1):
                        exc[int(r)] = rows[r].astype(np.float16)
                self.codes.append(codes)
            else:
                self.codes.append(rows.astype(np.float16))
            self.exceptions.append(exc)
            kb = k.reshape(self.n_cold, b, H, D)
            if self.retrieval == "mean":
                store = VectorStore(hd, "ip", use_faiss=False)
                if self.n_cold:
                    store.add(names, kb.mean(1).reshape(self.n_cold, hd).numpy())
                self.stores.append([store])
            else:
                per_head = []
                kmax, kmin = kb.amax(1), kb.amin(1)  # [n_cold, H, D]
                for h in range(H):
                    store = VectorStore(2 * D, "ip", use_faiss=False)
                    if self.n_cold:
                        store.add(names, torch.cat((kmax[:, h], kmin[:, h]), 1).numpy())
                    per_head.append(store)
                self.stores.append(per_head)
        self.tokens = list(ids)
        self.last_logits = None
        self.retrieved = 0

    # ------------------------------------------------------------------ sizes

    def cold_bytes(self) -> int:
        """Bytes the cold tier keeps (codes + summaries)."""
        codes = sum(c.nbytes for c in self.codes)
        exact = sum(r.nbytes + 4 for exc in self.exceptions for r in exc.values())  # row + its index
        return codes + exact + sum(s.vectors.nbytes for layer in self.stores for s in layer)

    def device_blocks(self) -> int:
        """Blocks one step attends to exactly: sinks, retrieved cold blocks, recent tokens."""
        hot = max(0, len(self.tokens) - self.cold_end) if self.tokens else 0
        return self.sinks + min(self.topk, self.n_cold) + -(-hot // self.block)

    def exact_bytes(self) -> int:
        """Bytes of exact keys and values kept (sinks + hot, float32)."""
        n = sum(k.numel() + v.numel() for k, v in self.sink) + sum(k.numel() for k in self.hot_k) * 2
        return n * 4

    # ------------------------------------------------------------------ decode

    def search(self, layer: int, q: torch.Tensor) -> list[int]:
        """The cold blocks (indices) the query ``q`` ``[H, D]`` of ``layer`` reads, best first."""
        if not self.n_cold:
            return []
        k = min(self.topk, self.n_cold)
        if self.retrieval == "mean":
            return [int(key) for key, _ in self.stores[layer][0].search(q.reshape(1, -1).numpy(), k)[0]]
        best: dict[int, float] = {}
        for h, store in enumerate(self.stores[layer]):
            qh = q[h].numpy()
            for key, score in store.search(np.concatenate((np.maximum(qh, 0), np.minimum(qh, 0)))[None], k)[0]:
                j = int(key)
                best[j] = max(best.get(j, -np.inf), score)
        return sorted(best, key=lambda j: (-best[j], j))[:k]

    def _cold_block(self, layer: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, H, D = self.block, self.cfg.n_heads, self.cfg.head_dim
        codes = self.codes[layer][j * b : (j + 1) * b]
        rows = codes.astype(np.float32) if self.codecs is None else self.codecs[layer].decode(codes)
        rows = np.array(rows, dtype=np.float32)
        exc = self.exceptions[layer]
        for r in range(j * b, (j + 1) * b) if exc else ():
            if r in exc:
                rows[r - j * b] = exc[r]
        kv = torch.from_numpy(rows)
        return kv[:, : H * D].view(b, H, D), kv[:, H * D :].view(b, H, D)

    def step(self, token: int | None = None) -> int:
        """Feed ``token`` (default: the greedy next token) and return it; the logits of its
        successor are in ``last_logits``."""
        if not self.tokens:
            raise SequenceStateError("prefill first")
        if token is None:
            if self.last_logits is None:
                raise SequenceStateError("a greedy step needs the logits of a prefill or a fed token")
            token = int(self.last_logits.argmax())
        tok = varref.check_ids([token])[0]
        m = self.model
        pos = torch.tensor([len(self.tokens)])
        with torch.no_grad():
            x = m.embed(torch.tensor([tok]), torch.tensor([self.tokens[-1]]))
            for layer in range(self.cfg.n_layers):
                q, k, v = m.qkv(layer, x, pos)
                self.hot_k[layer] = torch.cat((self.hot_k[layer], k))
                self.hot_v[layer] = torch.cat((self.hot_v[layer], v))
                ks, vs = [self.sink[layer][0]], [self.sink[layer][1]]
                for j in self.search(layer, q[0]):
                    bk, bv = self._cold_block(layer, j)
                    ks.append(bk)
                    vs.append(bv)
                    self.retrieved += 1
                ks.append(self.hot_k[layer])
                vs.append(self.hot_v[layer])
                K, V = torch.cat(ks), torch.cat(vs)  # [S, H, D]
                attn = attention(q.transpose(0, 1)[None], K.transpose(0, 1)[None], V.transpose(0, 1)[None])
                x = m.finish(layer, x, attn[0].transpose(0, 1))  # [1, H, D]
            self.last_logits = m.head(x)[0]
        self.tokens.append(tok)
        return tok

    def feed(self, tokens: Sequence[int]) -> None:
        for tok in varref.check_ids(tokens):
            self.step(tok)

    def generate(self, n: int) -> list[int]:
        return [self.step() for _ in range(n)]

    def close(self) -> None:
        """Nothing held outside this object (the shape of ``LongDecoder.close``)."""

    def describe(self) -> dict:
        return {
            "policy": "cold",
            "topk": self.topk,
            "sinks": self.sinks,
            "window": self.window // self.block,
            "retrieval": self.retrieval,
            "code_dim": 0 if self.codecs is None else self.codecs[0].code_dim,
            "exact_rows": self.exact_rows,
        }
