"""Codebook ("demopack") weights for the chain LM: k-means codebooks over weight sub-vectors.

Every linear layer of a :class:`lm.model.TinyLM` block (``qkv``, ``proj``, ``fc1``, ``fc2``) is cut
into sub-vectors of ``dim`` consecutive input weights; k-means (Lloyd's, k-means++ seeding,
a fixed seed; :func:`kmeans`) fits ``k`` codewords per matrix and each sub-vector keeps only its codeword's index
(one byte).  The embedding (tied with the output layer), layer norms and biases stay dense.

:class:`CodebookLinear` is the torch path, in three modes:

* ``"lut"`` — a lookup table ``T[n, b, k] = <x[n, b], codeword k>`` and a gather-sum over the codes:
  the dense matrix is never formed (the fused kernel of ``cuda/demopack.cu`` does the same per
  output with the codeword read in place);
* ``"decode"`` — the weight matrix synthesised from the codebook on every call, then a dense GEMM
  (what the seed's "synthesise weights on demand" does);
* ``"cached"`` — decoded once (small at rest only: the running model is dense).

:func:`int8_rows` is the peer at a similar footprint: per-output-row symmetric int8.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from accel.demopack import CodebookMatrix, CodebookShapeError, check_shape
from lm.model import TinyLM

LINEARS = ("qkv", "proj", "fc1", "fc2")
MODES = ("lut", "decode", "cached")


def kmeans(vectors: torch.Tensor, k: int, *, iters: int = 15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (torch, float32, a fixed seed); (centres, labels).
    An empty cluster takes the point farthest from its centre."""
    gen = torch.Generator().manual_seed(seed)
    n = vectors.shape[0]
    centres = vectors[torch.randint(n, (1,), generator=gen)]
    d2 = torch.cdist(vectors, centres).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to d^2
        pick = torch.multinomial(d2 + 1e-12, 1, generator=gen)
        centres = torch.cat([centres, vectors[pick]])
        d2 = torch.minimum(d2, ((vectors - vectors[pick]) ** 2).sum(1))
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(vectors, centres)
        new = dist.argmin(1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, vectors)
        counts = torch.bincount(labels, minlength=k)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = dist.gather(1, labels[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centres[empty] = vectors[far]
    labels = torch.cdist(vectors, centres).argmin(1)
    return centres, labels


def fit(w: np.ndarray, dim: int, k: int, *, iters: int = 15, seed: int = 0) -> CodebookMatrix:
    """A (k, dim) codebook and uint8 codes for ``w`` (rows, cols); shapes checked before any
    work (:class:`accel.demopack.CodebookShapeError`)."""
    if getattr(w, "ndim", None) != 2:
        raise CodebookShapeError(f"w must be a 2-D matrix, got shape {getattr(w, 'shape', None)}")
    rows, cols = w.shape
    check_shape(rows, cols, dim, k)
    n = rows * cols // dim
    if k > n:
        raise CodebookShapeError(f"{k} codewords for {n} sub-vectors")
    vectors = torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(n, dim)
    book, labels = kmeans(vectors, k, iters=iters, seed=seed)
    return CodebookMatrix(
        book.numpy().astype(np.float32), labels.numpy().astype(np.uint8).reshape(rows, cols // dim), (rows, cols)
    )


class CodebookLinear(nn.Module):
    """A linear layer whose weight is a codebook and codes (see the module docstring)."""

    def __init__(self, cb: CodebookMatrix, bias: torch.Tensor | None, mode: str = "lut") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.rows, self.cols = cb.shape
        self.dim = cb.dim
        self.nsub = self.cols // self.dim
        self.register_buffer("codebook", torch.from_numpy(np.ascontiguousarray(cb.codebook)))
        self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(cb.codes)).long())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stored_bytes = cb.nbytes + (0 if bias is None else bias.numel() * 4)
        self._cached = self.decoded() if mode == "cached" else None

    def decoded(self) -> torch.Tensor:
        return self.codebook[self.codes].reshape(self.rows, self.cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cached":
            return F.linear(x, self._cached, self.bias)
        if self.mode == "decode":
            return F.linear(x, self.decoded(), self.bias)
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.nsub, self.dim)
        table = torch.einsum("nbd,kd->nbk", xb, self.codebook)  # (N, nsub, K)
        y = table[:, torch.arange(self.nsub)[None, :], self.codes].sum(-1)  # (N, rows)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.rows)


def linear_weight_bytes(model: TinyLM) -> int:
    """Bytes of the block linears (weights and biases) as the model stores them."""
    total = 0
    for blk in model.blocks:
        for name in LINEARS:
            layer = getattr(blk, name)
            if isinstance(layer, CodebookLinear) or hasattr(layer, "stored_bytes"):
                total += int(layer.stored_bytes)
            else:
                total += sum(p.numel() * p.element_size() for p in layer.parameters())
    return total


def model_bytes(model: TinyLM) -> int:
    """Bytes of the whole model as stored (the block linears as :func:`linear_weight_bytes`)."""
    other = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not any(f".{lin}." in f".{n}" for lin in LINEARS)
    )
    return other + linear_weight_bytes(model)


def codebook_model(model: TinyLM, dim: int, k: int, *, mode: str = "lut", seed: int = 0) -> TinyLM:
    """A copy of ``model`` with every block linear replaced by a fitted :class:`CodebookLinear`."""
    out = copy.deepcopy(model)
    for i, blk in enumerate(out.blocks):
        for j, name in enumerate(LINEARS):
            layer = getattr(blk, name)
            cb = fit(layer.weight.detach().float().numpy(), dim, k, seed=seed * 1000 + 10 * i + j)
            setattr(blk, name, CodebookLinear(cb, layer.bias, mode))
    return out.eval()


class Int8Linear(nn.Module):
    """The peer: per-output-row symmetric int8 weights (scale = row amax / 127), dequantised in
    the forward."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        w = layer.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        self.register_buffer("q", torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.stored_bytes = (
            self.q.numel() + self.scale.numel() * 4 + (0 if self.bias is None else self.bias.numel() * 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.q.float() * self.scale, self.bias)


def int8_rows(model: TinyLM) -> TinyLM:
    out = copy.deepcopy(model)
    for blk in out.blocks:
        for name in LINEARS:
            setattr(blk, name, Int8Linear(getattr(blk, name)))
    return out.eval()


# -- measurement ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMScore:
    loss: float  # mean cross-entropy over held-out answer tokens (nats)
    perplexity: float
    token_accuracy: float  # greedy next-token accuracy on the answer tokens
    tokens: int


@torch.no_grad()
def heldout_score(model: TinyLM, *, batches: int = 8, batch_size: int = 32, seed: int = 20_251_124) -> LMScore:
    """Teacher-forced loss / perplexity / token accuracy on held-out chains (a seed training never
    uses; the same batches for every model)."""
    from lm.train import make_batch

    rng = random.Random(seed)
    total = correct = 0
    nll = 0.0
    for _ in range(batches):
        inputs, targets = make_batch(rng, batch_size)
        logits = model(inputs)
        valid = targets != -100
        nll += F.cross_entropy(logits[valid], targets[valid], reduction="sum").item()
        correct += (logits.argmax(-1)[valid] == targets[valid]).sum().item()
        total += int(valid.sum())
    loss = nll / total
    return LMScore(loss, math.exp(loss), correct / total, total)


def chain_accuracy(model: TinyLM, n_chains: int) -> float:
    """Greedy decoding through the paged engine; share of held-out chains that verify."""
    from lm.engine import Engine
    from lm.evaluate import evaluate, heldout

    return evaluate(Engine(model, num_blocks=256), heldout(n_chains)).chain_accuracy


def ms_per_token(model: TinyLM, tokens: int = 48, repeats: int = 3) -> float:
    """Median milliseconds per decoded token (greedy, one sequence, the paged engine)."""
    from lm import chains, tokenizer
    from lm.engine import Engine

    engine = Engine(model, num_blocks=256)
    prompt = tokenizer.encode(chains.prompt(chains.random_items(random.Random(7), 5)))
    times = []
    for _ in range(repeats):
        sid = engine.start(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            engine.step(sid)
        times.append((time.perf_counter() - t0) / tokens)
        engine.free(sid)
    return 1e3 * float(np.median(times))


def with_mode(model: TinyLM, mode: str) -> TinyLM:
    """A copy of a codebook model whose linears run in ``mode``."""
    out = copy.deepcopy(model)
    for blk in out.blocks:
        for name in LINEARS:
            lin = getattr(blk, name)
            lin.mode = mode
            lin._cached = lin.decoded() if mode == "cached" else None
    return out


def interleaved_ms_per_token(models: dict[str, TinyLM], rounds: int = 5, tokens: int = 32) -> dict[str, float]:
    """Median ms per token of each model, measured round-robin (one measurement of every model per
    round) so that a change in machine load hits every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(ms_per_token(m, tokens=tokens, repeats=1))
    return {name: float(np.median(t)) for name, t in times.items()}


def compare(
    model: TinyLM,
    configs: list[tuple[int, int]],
    *,
    chains_n: int,
    seed: int = 0,
    score_batches: int = 8,
    score_batch_size: int = 32,
) -> tuple[list[dict[str, Any]], dict[str, TinyLM]]:
    """One row per model (dense, int8 rows, and codebook (dim, k) for each config): size and
    accuracy; and the models to time (every codebook model in each of its modes)."""
    rows = []
    models: dict[str, TinyLM] = {}
    n_weights = sum(getattr(b, n).weight.numel() for b in model.blocks for n in LINEARS)

    def row(name: str, m: TinyLM) -> None:
        s = heldout_score(m, batches=score_batches, batch_size=score_batch_size)
        models[name] = m
        rows.append(
            {
                "model": name,
                "linear_kb": linear_weight_bytes(m) / 1024,
                "model_kb": model_bytes(m) / 1024,
                "bits_per_weight": 8 * linear_weight_bytes(m) / n_weights,
                "loss": s.loss,
                "ppl": s.perplexity,
                "tok_acc": s.token_accuracy,
                "chain_acc": chain_accuracy(m, chains_n),
            }
        )

    row("dense fp32", model)
    row("int8 rows", int8_rows(model))
    for dim, k in configs:
        cbm = codebook_model(model, dim, k, mode="lut", seed=seed)
        row(f"codebook d{dim} k{k} (lut)", cbm)
        for mode in ("decode", "cached"):
            name = f"codebook d{dim} k{k} ({mode})"
            models[name] = with_mode(cbm, mode)
            rows.append({"model": name})
    return rows, models
