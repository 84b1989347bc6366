"""Hierarchical memory (seed 004 C-7): a vector store with top-k search that persists to disk, a
reservoir of embeddings, and a small autoencoder that compresses what goes cold.

* :class:`VectorStore` -- keys (strings) -> unit vectors (cosine) or raw vectors (inner product);
  :meth:`~VectorStore.search` returns the top ``k`` (key, score) pairs, best first, ties broken by
  insertion order.  Backend: FAISS (``IndexFlatIP``, exact) when ``faiss`` imports, NumPy
  otherwise -- both exact, so they return the same neighbours (a test checks it).  :meth:`save`
  writes ``<path>.npz`` (vectors) and ``<path>.json`` (keys, metric) atomically (temp file +
  ``os.replace``); :meth:`load` refuses files that disagree with each other.
* :class:`AsyncVectorStore` -- the same store served to async code: ``async with
  AsyncVectorStore(store) as s`` opens an anyio task group that owns every background write
  (:meth:`~AsyncVectorStore.add_soon`, :meth:`~AsyncVectorStore.save_soon`); searches run in a
  worker thread (``anyio.to_thread``) under one lock, so a search never sees half an add; leaving
  the block waits for the writes (or cancels them with the group).
* :class:`Reservoir` -- a uniform sample of at most ``capacity`` embeddings of a stream
  (Vitter's Algorithm R, seeded), the training set of the compressor.
* :class:`Autoencoder` -- ``dim -> code`` (linear + tanh) and back (linear), trained on a
  reservoir sample with Adam; :meth:`~Autoencoder.encode` stores float16 codes.

Bad input raises :class:`VectorStoreError` subclasses (``ValueError``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
from collections.abc import Sequence

import anyio
import numpy as np

try:  # pragma: no cover - depends on the environment
    import faiss  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    faiss = None

METRICS = ("cosine", "ip")


class VectorStoreError(ValueError):
    """Base of the vector store's errors (bad input)."""


class DimensionError(VectorStoreError):
    """A vector (or query) whose width is not the store's, or not a finite 1-D/2-D array."""


class DuplicateKeyError(VectorStoreError):
    """A key already in the store."""


class StoreFileError(VectorStoreError):
    """Persisted files that are missing, unreadable or inconsistent."""


def _matrix(vectors: np.ndarray | Sequence, dim: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DimensionError(f"{what} must be numbers: {exc}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise DimensionError(f"{what} must have width {dim}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DimensionError(f"{what} must be finite")
    return arr


class VectorStore:
    """Exact top-k search over ``dim``-wide vectors (see the module docstring).

    Invariant: ``len(keys) == vectors.shape[0]`` and ``index[keys[i]] == i``; with the cosine
    metric every stored row has norm 1 (zero vectors are refused)."""

    def __init__(self, dim: int, metric: str = "cosine", *, use_faiss: bool | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise VectorStoreError(f"dim must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise VectorStoreError(f"metric must be one of {METRICS}, got {metric!r}")
        if use_faiss and faiss is None:
            raise VectorStoreError("faiss was asked for but does not import here")
        self.dim, self.metric = dim, metric
        self.backend = "faiss" if (faiss is not None if use_faiss is None else use_faiss) else "numpy"
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.vectors = np.zeros((0, dim), np.float32)
        self._faiss = faiss.IndexFlatIP(dim) if self.backend == "faiss" else None

    def __len__(self) -> int:
        return len(self.keys)

    def _prepare(self, arr: np.ndarray, what: str) -> np.ndarray:
        if self.metric == "cosine":
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            if (norms == 0).any():
                raise DimensionError(f"{what}: a zero vector has no direction (cosine metric)")
            arr = arr / norms
        return np.ascontiguousarray(arr, dtype=np.float32)

    def add(self, keys: Sequence[str], vectors: np.ndarray | Sequence) -> None:
        """Add ``keys[i] -> vectors[i]``; all or nothing."""
        if isinstance(keys, str):
            raise VectorStoreError("keys must be a sequence of strings, not one string")
        keys = list(keys)
        arr = self._prepare(_matrix(vectors, self.dim, "vectors"), "vectors")
        if len(keys) != arr.shape[0]:
            raise VectorStoreError(f"{len(keys)} keys for {arr.shape[0]} vectors")
        if any(not isinstance(k, str) for k in keys):
            raise VectorStoreError("keys must be strings")
        dup = [k for k in keys if k in self.index] or (
            [k for k in keys if keys.count(k) > 1] if len(set(keys)) < len(keys) else []
        )
        if dup:
            raise DuplicateKeyError(f"key {dup[0]!r} is already in the store")
        for k in keys:
            self.index[k] = len(self.keys)
            self.keys.append(k)
        self.vectors = np.concatenate((self.vectors, arr))
        if self._faiss is not None:
            self._faiss.add(arr)

    def search(self, query: np.ndarray | Sequence, k: int) -> list[list[tuple[str, float]]]:
        """Per query row, the top ``min(k, len)`` (key, score) pairs, best first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise VectorStoreError(f"k must be a positive integer, got {k!r}")
        q = self._prepare(_matrix(query, self.dim, "query"), "query")
        n = min(k, len(self.keys))
        if n == 0:
            return [[] for _ in range(q.shape[0])]
        if self._faiss is not None:
            scores, ids = self._faiss.search(q, n)
        else:
            sims = q @ self.vectors.T
            ids = np.argsort(-sims, axis=1, kind="stable")[:, :n]
            scores = np.take_along_axis(sims, ids, axis=1)
        return [[(self.keys[i], float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(ids, scores)]

    def get(self, key: str) -> np.ndarray:
        return self.vectors[self.index[key]]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """``<path>.npz`` and ``<path>.json``, each written whole or not at all."""
        base = pathlib.Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        npz, meta = base.with_suffix(".npz"), base.with_suffix(".json")
        tmp = base.with_suffix(".npz.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, vectors=self.vectors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, npz)
        tmpj = base.with_suffix(".json.tmp")
        tmpj.write_text(json.dumps({"dim": self.dim, "metric": self.metric, "keys": self.keys}))
        os.replace(tmpj, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, use_faiss: bool | None = None) -> VectorStore:
        base = pathlib.Path(path)
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
            with np.load(base.with_suffix(".npz")) as z:
                vectors = z["vectors"]
        except (OSError, ValueError, KeyError) as exc:
            raise StoreFileError(f"cannot read the store at {base}: {exc}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("keys"), list) or len(meta["keys"]) != len(vectors):
            raise StoreFileError(f"the store at {base}: keys and vectors disagree")
        store = cls(int(meta["dim"]), meta["metric"], use_faiss=use_faiss)
        if len(vectors):
            store.add(meta["keys"], vectors)
        return store


class AsyncVectorStore:
    """``async with AsyncVectorStore(store) as s``: searches in a worker thread, writes owned by
    the block's task group (see the module docstring)."""

    def __init__(self, store: VectorStore) -> None:
        self.store = store
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AsyncVectorStore:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc) -> bool | None:
        assert self._tg is not None
        try:
            return await self._tg.__aexit__(*exc)
        finally:
            self._tg = None

    def _group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise VectorStoreError("the async store is not open (use 'async with')")
        return self._tg

    async def add(self, keys: Sequence[str], vectors: np.ndarray | Sequence) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self.store.add, keys, vectors)

    def add_soon(self, keys: Sequence[str], vectors: np.ndarray | Sequence) -> None:
        """Add in the background, as a task of the block's group (its errors end the block)."""
        self._group().start_soon(self.add, list(keys), np.array(vectors, dtype=np.float32, copy=True))

    async def search(self, query: np.ndarray | Sequence, k: int) -> list[list[tuple[str, float]]]:
        async with self._lock:
            return await anyio.to_thread.run_sync(self.store.search, query, k)

    async def save(self, path: str | os.PathLike) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self.store.save, path)

    def save_soon(self, path: str | os.PathLike) -> None:
        self._group().start_soon(self.save, path)


class Reservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream (Algorithm R).

    Invariant: after ``seen`` rows each has been kept with probability ``capacity / seen``."""

    def __init__(self, capacity: int, dim: int, seed: int = 0) -> None:
        if capacity < 1 or dim < 1:
            raise VectorStoreError("capacity and dim must be positive")
        self.capacity, self.dim = capacity, dim
        self.rows = np.zeros((capacity, dim), np.float32)
        self.seen = 0
        self._rng = random.Random(seed)

    def add(self, vectors: np.ndarray | Sequence) -> None:
        for row in _matrix(vectors, self.dim, "vectors"):
            if self.seen < self.capacity:
                self.rows[self.seen] = row
            else:
                j = self._rng.randrange(self.seen + 1)
                if j < self.capacity:
                    self.rows[j] = row
            self.seen += 1

    def sample(self) -> np.ndarray:
        return self.rows[: min(self.seen, self.capacity)].copy()


class Autoencoder:
    """A ``dim -> code_dim -> dim`` autoencoder (tanh code), trained by :meth:`fit`; inputs are
    standardised with the training sample's mean and scale (kept with the weights)."""

    def __init__(self, dim: int, code_dim: int, seed: int = 0) -> None:
        import torch

        if not 1 <= code_dim <= dim:
            raise VectorStoreError(f"code_dim must lie in [1, dim={dim}], got {code_dim}")
        g = torch.Generator().manual_seed(seed)
        self.dim, self.code_dim = dim, code_dim
        self.enc_w = (torch.randn(dim, code_dim, generator=g) / math.sqrt(dim)).requires_grad_()
        self.enc_b = torch.zeros(code_dim, requires_grad=True)
        self.dec_w = (torch.randn(code_dim, dim, generator=g) / math.sqrt(code_dim)).requires_grad_()
        self.dec_b = torch.zeros(dim, requires_grad=True)
        self.mean = np.zeros(dim, np.float32)
        self.scale = np.float32(1.0)

    def fit(self, sample: np.ndarray, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
        """Train on ``sample`` ``[n, dim]``; returns the final relative reconstruction error."""
        import torch

        x = _matrix(sample, self.dim, "sample")
        if len(x) < 2:
            raise VectorStoreError("the autoencoder needs at least two training rows")
        self.mean = x.mean(0)
        self.scale = np.float32(x.std() or 1.0)
        t = torch.from_numpy((x - self.mean) / self.scale)
        params = [self.enc_w, self.enc_b, self.dec_w, self.dec_b]
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = t[torch.randint(0, len(t), (min(256, len(t)),), generator=g)]
            loss = ((self._dec(self._enc(batch)) - batch) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self.relative_error(x)

    def _enc(self, t):
        import torch

        return torch.tanh(t @ self.enc_w + self.enc_b)

    def _dec(self, c):
        return c @ self.dec_w + self.dec_b

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float16 codes ``[n, code_dim]`` of ``x`` ``[n, dim]``."""
        import torch

        t = torch.from_numpy((_matrix(x, self.dim, "x") - self.mean) / self.scale)
        with torch.no_grad():
            return self._enc(t).numpy().astype(np.float16)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        c = torch.from_numpy(_matrix(np.asarray(codes, np.float32), self.code_dim, "codes"))
        with torch.no_grad():
            return self._dec(c).numpy() * self.scale + self.mean

    def relative_error(self, x: np.ndarray) -> float:
        x = _matrix(x, self.dim, "x")
        rec = self.decode(self.encode(x))
        return float(np.linalg.norm(rec - x) / max(np.linalg.norm(x), 1e-12))
