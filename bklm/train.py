"""The trainer: one step at a time, with the seed's three data-side techniques, evaluation and
checkpoints that restore a run bit for bit.

:class:`Trainer` is a plain object (no sockets, no clock): ``step()`` runs one optimiser step and
returns a :class:`StepReport` with the FLOPs it executed; ``state_bytes()`` / ``load_state_bytes()``
save and restore everything a step depends on (weights, optimiser moments, the sampler's RNG, the
step counter, the gradient cache), so a run paused, killed or moved between processes continues
exactly as an uninterrupted one. Torch runs single-threaded and deterministic on the CPU.

Data-side techniques (switchable in :class:`TrainConfig`):

* ``curriculum`` — examples ordered by a difficulty metric: the per-token cross-entropy of the
  window under a character bigram model fit on the training split (the seed's "perplexity under a
  pretrained model", with the cheapest such model). At progress t the batch is drawn from the
  easiest ``frac(t)`` of the windows, frac rising linearly from ``curriculum_start`` to 1 over
  ``curriculum_ramp`` x ``total_steps`` (the seed's schedule starts at 0 %, an empty pool).
* ``active`` — uncertainty-based selection (the seed's ``ActiveLearningSelector``): each step
  scores ``active_pool`` x batch random windows by the model's mean predictive entropy (a forward
  pass without gradients, counted) and trains on the most uncertain batch.
* ``gradcache`` — gradient caching for near-duplicate batches (the seed's
  ``GradientCachingTrainer``): a batch whose signature has cosine similarity >= ``cache_threshold``
  with a cached one (at most ``cache_max_age`` steps old) reuses its gradients: no forward, no
  backward, only the optimiser step. Signatures: ``"shingle"`` — the set of hashed byte 5-grams of
  the batch's text (a near-duplicate detector), or ``"embedding"`` — the seed's mean token
  embedding (which calls almost any two batches of code "similar").
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import pathlib
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bklm.corpus import VOCAB, Corpus
from bklm.errors import BudgetTooSmallError, CheckpointError, ConfigError
from bklm.model import TRAIN_FLOP_FACTOR, LanguageModel, ModelConfig

CHECKPOINT_MAGIC = b"RECA-BKLM-1\n"
SIGNATURE_DIM = 1 << 16
SHINGLE = 5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    total_steps: int = 400  # the curriculum's schedule length
    eval_windows: int = 64
    curriculum: bool = False
    curriculum_start: float = 0.2
    curriculum_ramp: float = 0.5
    active: bool = False
    active_pool: int = 2
    gradcache: bool = False
    cache_signature: str = "shingle"
    cache_threshold: float = 0.9
    cache_size: int = 4
    cache_max_age: int = 20

    def __post_init__(self) -> None:
        for name in ("batch", "total_steps", "eval_windows", "active_pool", "cache_size", "cache_max_age"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}")
        if self.cache_signature not in ("shingle", "embedding"):
            raise ConfigError(f"cache_signature must be 'shingle' or 'embedding', got {self.cache_signature!r}")
        if not 0 < self.curriculum_start <= 1 or not 0 < self.curriculum_ramp <= 1:
            raise ConfigError("curriculum_start and curriculum_ramp must be in (0, 1]")
        if not -1 <= self.cache_threshold <= 1:
            raise ConfigError(f"cache_threshold must be a cosine in [-1, 1], got {self.cache_threshold}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a map, got {type(d).__name__}")
        d = dict(d)
        model = d.pop("model", {})
        if not isinstance(model, dict):
            raise ConfigError("config.model must be a map")
        names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training keys {sorted(unknown)}")
        try:
            return cls(model=ModelConfig.from_dict(model), **d)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StepReport:
    step: int  # steps done after this one
    loss: float  # training cross-entropy of the batch (nan on a cache hit: not computed)
    flops: int  # FLOPs executed by this step (training + scoring)
    ponder_steps: int  # ACT token-stage steps of the training forward
    cache_hit: bool
    keep_rate: float
    mean_stages: float
    wall_s: float


@dataclasses.dataclass
class CacheEntry:
    signature: torch.Tensor
    grads: list[torch.Tensor]
    step: int


def bigram_difficulty(corpus: Corpus, windows: np.ndarray) -> np.ndarray:
    """Per-window mean cross-entropy (nats) under an add-one bigram model of the training split."""
    t = corpus.train.astype(np.int64)
    counts = np.bincount(t[:-1] * VOCAB + t[1:], minlength=VOCAB * VOCAB).reshape(VOCAB, VOCAB) + 1.0
    nll = -np.log(counts / counts.sum(1, keepdims=True))
    return nll[windows[:, :-1], windows[:, 1:]].mean(1)


def shingle_signature(ids: np.ndarray) -> torch.Tensor:
    """The set of hashed byte 5-grams (shingles) of a batch (B, N) as a 0/1 vector
    (SIGNATURE_DIM,), L2-normalised: cosine of two is |A & B| / sqrt(|A| |B|), a near-duplicate
    test in the manner of shingling (counts would let indentation runs dominate every batch)."""
    h = np.zeros(ids[:, SHINGLE - 1:].shape, np.int64)
    for k in range(SHINGLE):
        h = (h * 1_000_003 + ids[:, k: ids.shape[1] - SHINGLE + 1 + k]) % 2_147_483_647
    v = np.zeros(SIGNATURE_DIM, np.float32)
    v[h.ravel() % SIGNATURE_DIM] = 1.0
    t = torch.from_numpy(v)
    return t / t.norm().clamp_min(1e-12)


class Trainer:
    """One training run. Invariant: ``step_count`` optimiser steps have been applied, and
    ``flops`` counts every FLOP executed for them (training, scoring, difficulty)."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus) -> None:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        self.cfg = cfg
        self.corpus = corpus
        self.train_windows = corpus.windows("train", cfg.model.n_seq)
        held = corpus.windows("heldout", cfg.model.n_seq)
        pick = np.linspace(0, len(held) - 1, min(cfg.eval_windows, len(held))).round().astype(int)
        self.eval_windows = torch.from_numpy(held[pick])
        torch.manual_seed(cfg.seed)
        self.model = LanguageModel(cfg.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.step_count = 0
        self.flops = 0
        self.cache: list[CacheEntry] = []
        self.cache_hits = 0
        self.order: np.ndarray | None = None
        if cfg.curriculum:
            difficulty = bigram_difficulty(corpus, self.train_windows)
            self.order = np.argsort(difficulty, kind="stable")  # easiest first
            self.flops += int(self.train_windows.size) * 2  # one lookup + add per token

    # -- one step -------------------------------------------------------------------------------

    def _lr(self) -> float:
        return self.cfg.lr * min(1.0, (self.step_count + 1) / self.cfg.warmup)

    def _candidates(self, n: int) -> np.ndarray:
        if self.order is None:
            return self.rng.integers(0, len(self.train_windows), n)
        cfg = self.cfg
        progress = self.step_count / max(1.0, cfg.curriculum_ramp * cfg.total_steps)
        frac = min(1.0, cfg.curriculum_start + (1 - cfg.curriculum_start) * progress)
        pool = max(n, int(math.ceil(frac * len(self.order))))
        return self.order[self.rng.integers(0, pool, n)]

    def _select(self) -> tuple[np.ndarray, int]:
        """(window indices of the batch, scoring FLOPs)."""
        cfg = self.cfg
        if not cfg.active:
            return self._candidates(cfg.batch), 0
        cand = self._candidates(cfg.batch * cfg.active_pool)
        ids = torch.from_numpy(self.train_windows[cand, :-1])
        with torch.no_grad():
            out = self.model(ids)
            logp = F.log_softmax(out.logits, -1)
            entropy = -(logp.exp() * logp).sum(-1).mean(1)  # (pool,)
        top = torch.topk(entropy, cfg.batch).indices.sort().values.numpy()
        return cand[top], out.flops + ids.numel() * VOCAB * 4

    def _signature(self, batch: np.ndarray) -> tuple[torch.Tensor, int]:
        if self.cfg.cache_signature == "shingle":
            return shingle_signature(batch[:, :-1]), batch.size * 2 * SHINGLE
        with torch.no_grad():
            emb = self.model.tok(torch.from_numpy(batch[:, :-1])).mean((0, 1))
        return emb / emb.norm().clamp_min(1e-12), batch.size * self.cfg.model.d_model

    def _cache_lookup(self, sig: torch.Tensor) -> CacheEntry | None:
        best, best_sim = None, self.cfg.cache_threshold
        for entry in self.cache:
            if self.step_count - entry.step > self.cfg.cache_max_age:
                continue
            sim = float(sig @ entry.signature)
            if sim >= best_sim:
                best, best_sim = entry, sim
        return best

    def step(self) -> StepReport:
        """One optimiser step; returns what it did and cost."""
        t0 = time.perf_counter()
        cfg = self.cfg
        chosen, flops = self._select()
        batch = self.train_windows[chosen]
        hit: CacheEntry | None = None
        sig = None
        if cfg.gradcache:
            sig, sig_flops = self._signature(batch)
            flops += sig_flops
            hit = self._cache_lookup(sig)
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        self.opt.zero_grad(set_to_none=True)
        params = list(self.model.parameters())
        if hit is not None:
            for p, g in zip(params, hit.grads):
                p.grad = None if g.numel() == 0 else g.clone()
            loss_value, ponder, keep, stages = float("nan"), 0, float("nan"), float("nan")
            self.cache_hits += 1
        else:
            x = torch.from_numpy(batch[:, :-1])
            y = torch.from_numpy(batch[:, 1:])
            loss, ce, out = self.model.loss(x, y)
            loss.backward()
            flops += TRAIN_FLOP_FACTOR * out.flops
            loss_value, ponder, keep, stages = float(ce.detach().mean()), out.ponder_steps, out.keep_rate, out.mean_stages
            if cfg.gradcache:
                assert sig is not None
                grads = [p.grad.detach().clone() if p.grad is not None else torch.empty(0) for p in params]
                self.cache.append(CacheEntry(sig, grads, self.step_count))
                del self.cache[: max(0, len(self.cache) - cfg.cache_size)]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step_count += 1
        self.flops += flops
        return StepReport(self.step_count, loss_value, flops, ponder, hit is not None, keep, stages,
                          time.perf_counter() - t0)

    def step_flops_bound(self) -> int:
        """An upper bound on one step's FLOPs (every token through every stage, the full pool
        scored), measured by a forward pass that changes nothing."""
        cfg = self.cfg
        ids = torch.zeros(1, cfg.model.n_seq, dtype=torch.long)
        with torch.no_grad():
            model_cfg = dataclasses.replace(cfg.model, act=False, sparsity=False)
            torch_state = torch.random.get_rng_state()
            per_row = LanguageModel(model_cfg)(ids).flops
            torch.random.set_rng_state(torch_state)
        if cfg.model.act:
            per_row += 2 * cfg.model.n_seq * len(self.model.stages) * (cfg.model.d_model ** 2)
        bound = TRAIN_FLOP_FACTOR * per_row * cfg.batch
        if cfg.active:
            bound += (per_row + cfg.model.n_seq * VOCAB * 4) * cfg.batch * cfg.active_pool
        if cfg.gradcache:
            bound += (cfg.model.n_seq + 1) * cfg.batch * max(2 * SHINGLE, cfg.model.d_model)
        return int(bound)

    def check_budget(self, available_flops: float) -> None:
        """:class:`BudgetTooSmallError` if ``available_flops`` cannot pay for one step."""
        needed = self.step_flops_bound()
        if available_flops < needed:
            raise BudgetTooSmallError(needed, available_flops)

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, windows: torch.Tensor | None = None, chunk: int = 32) -> tuple[float, int]:
        """(mean held-out cross-entropy in nats per token, forward FLOPs spent)."""
        windows = self.eval_windows if windows is None else windows
        total, flops = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(windows), chunk):
                w = windows[i: i + chunk]
                _, ce, out = self.model.loss(w[:, :-1], w[:, 1:])
                total += float(ce.sum())
                flops += out.flops
        return total / (len(windows) * (windows.shape[1] - 1)), flops

    # -- state ----------------------------------------------------------------------------------

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "corpus": self.corpus.digest,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.random.get_rng_state(),
            "step": self.step_count,
            "flops": self.flops,
            "cache_hits": self.cache_hits,
            "cache": [{"signature": e.signature, "grads": e.grads, "step": e.step} for e in self.cache],
        }

    def state_bytes(self) -> bytes:
        """The checkpoint: magic, sha256 of the payload, payload (torch.save of state_dict)."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        payload = buf.getvalue()
        return CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload

    def load_state_bytes(self, data: bytes) -> None:
        """Restore a checkpoint; :class:`CheckpointError` (state unchanged) if it is damaged or
        was written for another config or corpus."""
        head = len(CHECKPOINT_MAGIC)
        if not data.startswith(CHECKPOINT_MAGIC) or len(data) < head + 32:
            raise CheckpointError("not a bklm checkpoint (bad magic or truncated header)")
        digest, payload = data[head: head + 32], data[head + 32:]
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointError("checkpoint is corrupt: its sha256 does not match its contents")
        try:
            state = torch.load(io.BytesIO(payload), weights_only=False)
        except Exception as exc:  # noqa: BLE001 - an intact digest over an unloadable payload
            raise CheckpointError(f"checkpoint payload cannot be loaded: {exc}") from exc
        if state.get("config") != self.cfg.to_dict():
            raise CheckpointError("checkpoint was written by a run with another config")
        if state.get("corpus") != self.corpus.digest:
            raise CheckpointError("checkpoint was written for another corpus (digest differs)")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        torch.random.set_rng_state(state["torch_rng"])
        self.step_count = int(state["step"])
        self.flops = int(state["flops"])
        self.cache_hits = int(state["cache_hits"])
        self.cache = [CacheEntry(e["signature"], e["grads"], int(e["step"])) for e in state["cache"]]

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint atomically (temp file, fsync, rename)."""
        path = pathlib.Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(self.state_bytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
        self.load_state_bytes(data)
